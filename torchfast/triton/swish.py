"""swish / SiLU in Triton: y = x * sigmoid(x), dy/dx = s * (1 + x * (1 - s)) with s = sigmoid(x).

Three layers, each usable on its own:
  _swish_fwd_kernel, _swish_bwd_kernel   the Triton kernels, on flat memory
  swish_fwd(x), swish_bwd(grad_out, x)   launchers: argument checks, output layout, launch (not
                                         differentiable)
  swish(x)                               the differentiable entry the registry calls for impl="triton":
                                         the PyTorch operator torchfast::swish_triton, whose backward
                                         is the operator torchfast::swish_backward_triton

Both operators are `torch.library.triton_op`s launching through `torch.library.wrap_triton`, so
torch.compile(fullgraph=True) sees the kernels (Inductor schedules them with the rest of the graph)
and opcheck applies; autograd saves only x, as the native op does.

CPU tensors: with TRITON_INTERPRET=1 the kernels run in Triton's interpreter and the same operators
work eagerly, forward, backward and double backward (the tests use that), so there is one code path on
every device. Tracing them on CPU does not work: under the interpreter `wrap_triton` hands back the raw
interpreted kernel, which then reads the data pointers of fake tensors, so opcheck's fake-tensor tests
and torch.compile of the CPU path fail. Those checks run on a GPU only.

Imported lazily (by torchfast.ops.swish when the Triton implementation is chosen): importing torchfast
never imports Triton.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.triton import unavailable_reason

# 1024 elements per program: 8 per thread at the default 4 warps, i.e. two 16-byte accesses per thread
# for fp32 (one for bf16/fp16), enough to keep an elementwise kernel at memory bandwidth. Under the
# interpreter a large block also means fewer (slow, Python-level) program instances.
_BLOCK = 1024

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Numerics, shared by both kernels:
# - bf16/fp16 are loaded, widened to fp32, computed in fp32 and rounded once on store, so the result
#   is within one output rounding of the exact value (the tolerance table in torchfast.testing).
#   float64 is computed in float64 (F64 is a constexpr, so each dtype compiles only its own branch).
# - sigmoid from e = exp(-|x|), which lies in (0, 1] and never overflows: s = 1 / (1 + e) for x >= 0,
#   e / (1 + e) for x < 0. The naive 1 / (1 + exp(-x)) overflows exp below about x = -88 in fp32, and
#   flushes swish(x) there to -0 instead of its tiny true value (under the interpreter numpy also warns
#   about the overflow on every such call).
# - Special values come out as F.silu and its backward give them: x = -inf has e = 0, s = 0 and
#   y = -inf * 0 = NaN; x = +inf has s = 1 and y = +inf; NaN stays NaN (e is NaN, and so is s). In the
#   backward, 1 - s cancels for large positive x, but there x * (1 - s) is negligible next to 1 anyway;
#   at x = +inf it is inf * 0 = NaN and at x = -inf the product s * (1 + x) is 0 * -inf = NaN, both as
#   in torch's silu_backward.
# - On a GPU, fp32 tl.exp is the hardware ex2.approx of x * log2(e) (a few ulp) and fp32 division is
#   div.full (2 ulp): well inside the fp32 tolerance. fp64 exp goes to libdevice's __nv_exp.
# - Offsets are int64: program_id * BLOCK in int32 overflows once a tensor has 2^31 elements or more.


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _swish_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if F64:
        xc = x
    else:
        xc = x.to(tl.float32)
    y = xc * _sigmoid(xc)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swish_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr, F64: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    x = tl.load(x_ptr + offs, mask=mask)
    if F64:
        gc = g
        xc = x
    else:
        gc = g.to(tl.float32)
        xc = x.to(tl.float32)
    s = _sigmoid(xc)
    dx = gc * s * (1.0 + xc * (1.0 - s))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check_input(t: torch.Tensor, op: str, arg: str) -> None:
    """The C++ ops' checks (csrc/include/torchfast/checks.h), with the same messages."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"torchfast.{op}: argument '{arg}' must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise RuntimeError(f"torchfast.{op}: argument '{arg}' has layout {t.layout}; "
                           "only dense (strided) tensors are supported")
    if t.dtype not in _DTYPES:
        raise TypeError(f"torchfast.{op}: argument '{arg}' has dtype {t.dtype}; "
                        "supported dtypes are float32, float64, bfloat16 and float16")
    why = unavailable_reason(t.device.type)
    if why:
        raise RuntimeError(f"torchfast.{op} (triton): argument '{arg}' is on {t.device}: {why}")


def _laid_out_like(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`t` in `out`'s memory layout, so the kernels can walk both as flat arrays in the same order.

    The rule of the native kernels (laid_out_like in checks.h): `out` is torch.empty_like(x), which is
    always non-overlapping and dense (x's own strides when x is dense, else x.suggest_memory_format()),
    and is what the fake kernel promises. Since `t` has out's shape, equal strides already imply that t
    is non-overlapping and dense too, so t is used as it is then (x itself whenever x is dense:
    channels-last and transposed inputs cost no copy) and copied into out's layout otherwise (views
    with gaps, a stride-0 grad_out from .sum().backward(), a grad_out in another layout)."""
    if t.stride() == out.stride():
        return t
    return torch.empty_like(out).copy_(t)


def _grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def swish_fwd(x: torch.Tensor) -> torch.Tensor:
    """y = x * sigmoid(x) by `_swish_fwd_kernel`; y = torch.empty_like(x) (the layout of the native
    kernels and of the fake kernel). Not differentiable: use `swish` for autograd.

    x: float32, float64, bfloat16 or float16, any shape (empty and 0-d included) and strides, on CUDA
    (or on CPU under TRITON_INTERPRET=1)."""
    _check_input(x, "swish", "x")
    y = torch.empty_like(x)
    n = y.numel()
    if n > 0:
        xd = _laid_out_like(x, y)
        wrap_triton(_swish_fwd_kernel)[_grid(n)](xd, y, n, BLOCK=_BLOCK, F64=x.dtype == torch.float64)
    return y


def swish_bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_out * s * (1 + x * (1 - s)), s = sigmoid(x), by `_swish_bwd_kernel`;
    grad_x = torch.empty_like(x). grad_out and x must agree in shape, dtype and device; grad_out may
    have any strides (stride 0 included)."""
    _check_input(grad_out, "swish_backward", "grad_out")
    _check_input(x, "swish_backward", "x")
    if grad_out.device != x.device:
        raise RuntimeError(f"torchfast.swish_backward: 'grad_out' is on {grad_out.device} but 'x' is on "
                           f"{x.device}; they must be on the same device")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"torchfast.swish_backward: 'grad_out' has dtype {grad_out.dtype} but 'x' has "
                        f"dtype {x.dtype}; they must match")
    # torch._check rather than `if ... raise`, so that symbolic shapes under torch.compile are checked
    # without a data-dependent branch; eagerly it raises RuntimeError with this message.
    torch._check(
        grad_out.shape == x.shape,
        lambda: f"torchfast.swish_backward: 'grad_out' has shape {tuple(grad_out.shape)} but 'x' has "
        f"shape {tuple(x.shape)}; they must match",
    )
    grad_x = torch.empty_like(x)
    n = grad_x.numel()
    if n > 0:
        gd = _laid_out_like(grad_out, grad_x)
        xd = _laid_out_like(x, grad_x)
        wrap_triton(_swish_bwd_kernel)[_grid(n)](gd, xd, grad_x, n, BLOCK=_BLOCK,
                                                 F64=x.dtype == torch.float64)
    return grad_x


# The launchers themselves become the operators: triton_op runs each one as the eager kernel (with
# wrap_triton off, so eager calls launch directly) and traces it as the fake kernel and for Inductor
# (with wrap_triton on, so the launch is recorded). Their type hints give the schemas
# (Tensor x) -> Tensor and (Tensor grad_out, Tensor x) -> Tensor.
swish_triton = triton_op("torchfast::swish_triton", swish_fwd, mutates_args=())
swish_backward_triton = triton_op("torchfast::swish_backward_triton", swish_bwd, mutates_args=())


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)  # only x: the backward recomputes sigmoid(x) instead of keeping it alive


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.torchfast.swish_backward_triton(grad_out, x)


def _setup_context_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_bwd(ctx, grad):
    """Double backward: d/d(grad_out) = swish'(x); d/dx = grad_out * swish''(x), with
    swish''(x) = s * (1 - s) * (2 + x * (1 - 2 s)), in plain torch (rarely used, not worth a kernel)."""
    grad_out, x = ctx.saved_tensors
    s = torch.sigmoid(x)
    d2 = s * (1 - s) * (2 + x * (1 - 2 * s))
    return torch.ops.torchfast.swish_backward_triton(grad, x), grad * grad_out * d2


swish_triton.register_autograd(_backward, setup_context=_setup_context)
swish_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)
# The native ops' autocast policy: run in the input's own dtype (the math inside is fp32 anyway).
_library.register_autocast_same_dtype("torchfast::swish_triton")
_library.register_autocast_same_dtype("torchfast::swish_backward_triton")


def swish(x: torch.Tensor) -> torch.Tensor:
    """swish(x) = x * sigmoid(x) with the Triton kernels, differentiable (backward saves only x).

    This is what `torchfast.swish(x, impl="triton")` and `with torchfast.use_impl("triton"):` run."""
    return torch.ops.torchfast.swish_triton(x)
