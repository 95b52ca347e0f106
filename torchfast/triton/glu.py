"""swiglu / geglu in Triton, separate (gate, up) and packed (x = [gate | up] along the last dimension):
y = act(gate) * up; d_gate = dy * up * act'(gate), d_up = dy * act(gate).

Layers as in torchfast/triton/swish.py: kernels; launchers `glu_fwd` / `glu_bwd` / `glu_packed_fwd` /
`glu_packed_bwd`; the operators torchfast::glu_triton, glu_backward_triton, glu_packed_triton and
glu_packed_backward_triton (one per form, the activation a string argument: "swish", "gelu",
"gelu_tanh"), whose autograd saves only the inputs; and the functions the registry's impl="triton"
runs: `swiglu`, `swiglu_packed`, `geglu`, `geglu_packed`.

Layouts are the native ops': y = torch.empty_like(gate) with gate and up read in that layout; the
packed form reads x contiguous and writes y and grad_x contiguous. Activation math: torchfast/triton/
_act.py. On CPU the kernels run under TRITON_INTERPRET=1; tracing them works on a GPU only.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.reference._activations import gelu_act
from torchfast.reference.glu import glu_double_backward
from torchfast.triton._act import ACT_CODES, act_fwd, act_fwd_deriv
from torchfast.triton.swish import _check_input, _grid, _laid_out_like

_BLOCK = 1024
_GATED = ("swish", "gelu", "gelu_tanh")


@triton.jit
def _glu_fwd_kernel(
    g_ptr,
    u_ptr,
    y_ptr,
    n,
    half,
    row_stride,
    ACT: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if PACKED:  # gate at row * 2H + c, up H further
        src = (offs // half) * row_stride + offs % half
    else:
        src = offs
    g = tl.load(g_ptr + src, mask=mask)
    u = tl.load(u_ptr + src, mask=mask)
    if not F64:
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    y = act_fwd(g, ACT, F64) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n,
    half,
    row_stride,
    ACT: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if PACKED:
        src = (offs // half) * row_stride + offs % half
    else:
        src = offs
    dy = tl.load(dy_ptr + offs, mask=mask)
    g = tl.load(g_ptr + src, mask=mask)
    u = tl.load(u_ptr + src, mask=mask)
    if not F64:
        dy = dy.to(tl.float32)
        g = g.to(tl.float32)
        u = u.to(tl.float32)
    y, d = act_fwd_deriv(g, ACT, F64)
    tl.store(dg_ptr + src, (dy * u * d).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + src, (dy * y).to(du_ptr.dtype.element_ty), mask=mask)


def _code(act: str, op: str) -> int:
    if act not in _GATED:
        raise ValueError(
            f"torchfast.{op}: unknown gated activation {act!r}; expected one of {', '.join(_GATED)}"
        )
    return ACT_CODES[act]


def _check_pair(a, b, op, an, bn):
    _check_input(a, op, an)
    _check_input(b, op, bn)
    if a.device != b.device:
        raise RuntimeError(
            f"torchfast.{op}: '{an}' is on {a.device} but '{bn}' is on {b.device}; they must be on "
            "the same device"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"torchfast.{op}: '{an}' has dtype {a.dtype} but '{bn}' has dtype {b.dtype}; they must match"
        )
    torch._check(
        a.shape == b.shape,
        lambda: (
            f"torchfast.{op}: '{an}' has shape {tuple(a.shape)} but '{bn}' has "
            f"shape {tuple(b.shape)}; they must match"
        ),
    )


def _half(x, op):
    torch._check(
        x.dim() >= 1,
        lambda: (
            f"torchfast.{op}: argument 'x' is 0-dimensional; a packed input holds the "
            "gate and up halves side by side along its last dimension"
        ),
    )
    torch._check_value(
        x.shape[-1] % 2 == 0,
        lambda: (
            f"torchfast.{op}: argument 'x' has an odd last dimension "
            f"({x.shape[-1]}); a packed input holds the gate and up halves side by side, so its width "
            "must be even"
        ),
    )
    return x.shape[-1] // 2


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    code = _code(act, "glu")
    _check_pair(gate, up, "glu", "gate", "up")
    y = torch.empty_like(gate)
    n = y.numel()
    if n > 0:
        wrap_triton(_glu_fwd_kernel)[_grid(n)](
            _laid_out_like(gate, y),
            _laid_out_like(up, y),
            y,
            n,
            1,
            1,
            ACT=code,
            PACKED=False,
            BLOCK=_BLOCK,
            F64=y.dtype == torch.float64,
        )
    return y


def glu_bwd(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code(act, "glu_backward")
    _check_pair(gate, up, "glu_backward", "gate", "up")
    _check_pair(grad_out, gate, "glu_backward", "grad_out", "gate")
    dg, du = torch.empty_like(gate), torch.empty_like(gate)
    n = dg.numel()
    if n > 0:
        wrap_triton(_glu_bwd_kernel)[_grid(n)](
            _laid_out_like(grad_out, dg),
            _laid_out_like(gate, dg),
            _laid_out_like(up, dg),
            dg,
            du,
            n,
            1,
            1,
            ACT=code,
            PACKED=False,
            BLOCK=_BLOCK,
            F64=dg.dtype == torch.float64,
        )
    return dg, du


def glu_packed_fwd(x: torch.Tensor, act: str) -> torch.Tensor:
    code = _code(act, "glu_packed")
    _check_input(x, "glu_packed", "x")
    h = _half(x, "glu_packed")
    y = x.new_empty((*x.shape[:-1], h))
    n = y.numel()
    if n > 0:
        xc = x.contiguous()
        wrap_triton(_glu_fwd_kernel)[_grid(n)](
            xc, xc[..., h:], y, n, h, 2 * h, ACT=code, PACKED=True, BLOCK=_BLOCK, F64=x.dtype == torch.float64
        )
    return y


def glu_packed_bwd(grad_out: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    code = _code(act, "glu_packed_backward")
    _check_input(grad_out, "glu_packed_backward", "grad_out")
    _check_input(x, "glu_packed_backward", "x")
    h = _half(x, "glu_packed_backward")
    torch._check(
        grad_out.shape == (*x.shape[:-1], h),
        lambda: (
            f"torchfast.glu_packed_backward: 'grad_out' has shape "
            f"{tuple(grad_out.shape)} but the output of a packed 'x' of shape {tuple(x.shape)} has shape "
            f"{(*x.shape[:-1], h)}"
        ),
    )
    dx = x.new_empty(x.shape)
    n = grad_out.numel()
    if n > 0:
        xc = x.contiguous()
        wrap_triton(_glu_bwd_kernel)[_grid(n)](
            grad_out.contiguous(),
            xc,
            xc[..., h:],
            dx,
            dx[..., h:],
            n,
            h,
            2 * h,
            ACT=code,
            PACKED=True,
            BLOCK=_BLOCK,
            F64=x.dtype == torch.float64,
        )
    return dx


glu_triton = triton_op("torchfast::glu_triton", glu_fwd, mutates_args=())
glu_backward_triton = triton_op("torchfast::glu_backward_triton", glu_bwd, mutates_args=())
glu_packed_triton = triton_op("torchfast::glu_packed_triton", glu_packed_fwd, mutates_args=())
glu_packed_backward_triton = triton_op(
    "torchfast::glu_packed_backward_triton", glu_packed_bwd, mutates_args=()
)


def _setup(ctx, inputs, output):
    *tensors, act = inputs
    ctx.act = act
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_out):
    return (*torch.ops.torchfast.glu_backward_triton(grad_out, *ctx.saved_tensors, ctx.act), None)


def _backward_packed(ctx, grad_out):
    return torch.ops.torchfast.glu_packed_backward_triton(grad_out, *ctx.saved_tensors, ctx.act), None


def _backward_bwd(ctx, g_gate, g_up):
    return (*glu_double_backward(ctx.act, *ctx.saved_tensors, g_gate, g_up), None)


def _backward_packed_bwd(ctx, g_x):
    grad_out, x = ctx.saved_tensors
    gate, up = x.chunk(2, dim=-1)
    g_gate, g_up = (None, None) if g_x is None else g_x.chunk(2, dim=-1)
    d_go, d_gate, d_up = glu_double_backward(ctx.act, grad_out, gate, up, g_gate, g_up)
    return d_go, torch.cat([d_gate, d_up], dim=-1), None


glu_triton.register_autograd(_backward, setup_context=_setup)
glu_backward_triton.register_autograd(_backward_bwd, setup_context=_setup)
glu_packed_triton.register_autograd(_backward_packed, setup_context=_setup)
glu_packed_backward_triton.register_autograd(_backward_packed_bwd, setup_context=_setup)


def _autocast_promote(gate, up, act):
    if gate.dtype != up.dtype:
        common = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(common), up.to(common)
    return (gate, up, act), {}


_library.register_autocast_casting("torchfast::glu_triton", _autocast_promote)
for _name in ("glu_backward_triton", "glu_packed_triton", "glu_packed_backward_triton"):
    _library.register_autocast_same_dtype(f"torchfast::{_name}")


def swiglu(gate, up):
    return torch.ops.torchfast.glu_triton(gate, up, "swish")


def swiglu_packed(x):
    return torch.ops.torchfast.glu_packed_triton(x, "swish")


def geglu(gate, up, approximate="none"):
    return torch.ops.torchfast.glu_triton(gate, up, gelu_act(approximate, "geglu"))


def geglu_packed(x, approximate="none"):
    return torch.ops.torchfast.glu_packed_triton(x, gelu_act(approximate, "geglu"))
