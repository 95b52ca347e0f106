"""bias_act in Triton: y = act(x + bias) (bias along the last dimension), and its backward
dx = dy * act'(x + bias), dbias = sum of dx over the leading dimensions.

Layers as in torchfast/triton/swish.py: the kernels; the launchers `bias_act_fwd` / `bias_act_bwd`
(checks, layout, launch; not differentiable); the operators torchfast::bias_act_triton and
torchfast::bias_act_backward_triton (triton_op + wrap_triton, so torch.compile sees the kernels),
with autograd saving only x and bias; and `bias_act(x, bias, act=...)`, what impl="triton" runs.

Layouts are the native op's: with a bias, x is made contiguous and y is contiguous; without one, y is
torch.empty_like(x) and x is read in that layout. The bias gradient is deterministic, without atomics:
a program owns BLOCK_C columns and a slice of the rows, sums dx down its rows in fp32 (fp64 for
float64) and writes one partial row; torch adds the partial rows (in the same fp32/fp64).

On CPU the kernels run under TRITON_INTERPRET=1 (the tests do); tracing (opcheck, torch.compile) of the
Triton ops works on a GPU only (see torchfast/triton/swish.py).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.reference._activations import check_act
from torchfast.reference.bias_act import bias_act_double_backward
from torchfast.triton import unavailable_reason
from torchfast.triton._act import ACT_CODES, act_bwd, act_fwd
from torchfast.triton.swish import _check_input, _grid, _laid_out_like

_BLOCK = 1024
_BLOCK_R, _BLOCK_C = 16, 64
_MAX_ROW_SLICES = 64


@triton.jit
def _bias_act_fwd_kernel(
    x_ptr,
    b_ptr,
    y_ptr,
    n,
    cols,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    F64: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    xc = x if F64 else x.to(tl.float32)
    if HAS_BIAS:
        xc += tl.load(b_ptr + offs % cols, mask=mask)
    y = act_fwd(xc, ACT, F64)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_dx_kernel(g_ptr, x_ptr, dx_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    x = tl.load(x_ptr + offs, mask=mask)
    if not F64:
        g = g.to(tl.float32)
        x = x.to(tl.float32)
    dx = act_bwd(g, x, ACT, F64)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_reduce_kernel(
    g_ptr,
    x_ptr,
    b_ptr,
    dx_ptr,
    partial_ptr,
    rows,
    cols,
    rows_per_slice,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    F64: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < cols
    b = tl.load(b_ptr + c, mask=cmask, other=0.0)
    r0 = tl.program_id(1).to(tl.int64) * rows_per_slice
    r_end = tl.minimum(r0 + rows_per_slice, rows)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64 if F64 else tl.float32)
    for start in range(0, rows_per_slice, BLOCK_R):
        r = r0 + start + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & cmask[None, :]
        offs = r[:, None] * cols + c[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if not F64:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        dx = act_bwd(g, x + b[None, :], ACT, F64)
        dx = tl.where(mask, dx, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dx, axis=0)
    tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * cols + c, acc, mask=cmask)


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_bias(x, bias, op):
    _check_input(bias, op, "bias")
    if bias.device != x.device:
        raise RuntimeError(
            f"torchfast.{op}: 'bias' is on {bias.device} but 'x' is on {x.device}; they must be "
            "on the same device"
        )
    if bias.dtype != x.dtype:
        raise TypeError(
            f"torchfast.{op}: 'bias' has dtype {bias.dtype} but 'x' has dtype {x.dtype}; they must match"
        )
    torch._check(
        x.dim() >= 1 and bias.dim() == 1 and bias.shape[0] == x.shape[-1],
        lambda: (
            f"torchfast.{op}: argument 'bias' has shape {list(bias.shape)} but x's last dimension "
            f"is {x.shape[-1] if x.dim() else None}; bias must be 1-D with x.size(-1) elements"
        ),
    )


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x + bias) by `_bias_act_fwd_kernel` (not differentiable: use `bias_act`)."""
    _check_input(x, "bias_act", "x")
    code = ACT_CODES[check_act(act, "bias_act")]
    f64 = x.dtype == torch.float64
    if bias is None:
        y = torch.empty_like(x)
        if y.numel() > 0:
            wrap_triton(_bias_act_fwd_kernel)[_grid(y.numel())](
                _laid_out_like(x, y), y, y, y.numel(), 1, ACT=code, HAS_BIAS=False, BLOCK=_BLOCK, F64=f64
            )
        return y
    _check_bias(x, bias, "bias_act")
    y = x.new_empty(x.shape)
    if y.numel() > 0:
        b = bias.to(_compute_dtype(x)).contiguous()
        wrap_triton(_bias_act_fwd_kernel)[_grid(y.numel())](
            x.contiguous(), b, y, y.numel(), x.shape[-1], ACT=code, HAS_BIAS=True, BLOCK=_BLOCK, F64=f64
        )
    return y


def bias_act_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias) by `_bias_act_dx_kernel` (no bias) or `_bias_act_bwd_reduce_kernel`; dbias has bias's
    shape and dtype, or shape [0] when bias is None."""
    op = "bias_act_backward"
    _check_input(grad_out, op, "grad_out")
    _check_input(x, op, "x")
    code = ACT_CODES[check_act(act, op)]
    if grad_out.dtype != x.dtype:
        raise TypeError(
            f"torchfast.{op}: 'grad_out' has dtype {grad_out.dtype} but 'x' has dtype {x.dtype}; "
            "they must match"
        )
    torch._check(
        grad_out.shape == x.shape,
        lambda: (
            f"torchfast.{op}: 'grad_out' has shape "
            f"{tuple(grad_out.shape)} but 'x' has shape {tuple(x.shape)}; they must match"
        ),
    )
    f64 = x.dtype == torch.float64
    if bias is None:
        dx = torch.empty_like(x)
        if dx.numel() > 0:
            wrap_triton(_bias_act_dx_kernel)[_grid(dx.numel())](
                _laid_out_like(grad_out, dx),
                _laid_out_like(x, dx),
                dx,
                dx.numel(),
                ACT=code,
                BLOCK=_BLOCK,
                F64=f64,
            )
        return dx, x.new_empty((0,))
    _check_bias(x, bias, op)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    dx = x.new_empty(x.shape)
    if x.numel() == 0:
        return dx, torch.zeros_like(bias, memory_format=torch.contiguous_format)
    slices = min(triton.cdiv(rows, _BLOCK_R), _MAX_ROW_SLICES)
    rows_per_slice = triton.cdiv(triton.cdiv(rows, slices), _BLOCK_R) * _BLOCK_R
    slices = triton.cdiv(rows, rows_per_slice)
    partial = torch.empty((slices, cols), dtype=_compute_dtype(x), device=x.device)
    grid = (triton.cdiv(cols, _BLOCK_C), slices)
    wrap_triton(_bias_act_bwd_reduce_kernel)[grid](
        grad_out.contiguous(),
        x.contiguous(),
        bias.to(_compute_dtype(x)).contiguous(),
        dx,
        partial,
        rows,
        cols,
        rows_per_slice,
        ACT=code,
        BLOCK_R=_BLOCK_R,
        BLOCK_C=_BLOCK_C,
        F64=f64,
    )
    return dx, partial.sum(0).to(bias.dtype)


bias_act_triton = triton_op("torchfast::bias_act_triton", bias_act_fwd, mutates_args=())
bias_act_backward_triton = triton_op("torchfast::bias_act_backward_triton", bias_act_bwd, mutates_args=())


def _setup_context(ctx, inputs, output):
    x, bias, act = inputs
    ctx.act = act
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    dx, db = torch.ops.torchfast.bias_act_backward_triton(grad_out, x, bias, ctx.act)
    return dx, (db if ctx.has_bias else None), None


def _setup_context_bwd(ctx, inputs, output):
    grad_out, x, bias, act = inputs
    ctx.act = act
    ctx.save_for_backward(grad_out, x, bias)


def _backward_bwd(ctx, grad_dx, grad_db):
    grad_out, x, bias = ctx.saved_tensors
    first = lambda g: torch.ops.torchfast.bias_act_backward_triton(g, x, bias, ctx.act)[0]
    return (*bias_act_double_backward(first, ctx.act, grad_out, x, bias, grad_dx, grad_db), None)


bias_act_triton.register_autograd(_backward, setup_context=_setup_context)
bias_act_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_context_bwd)


def _autocast_bias_follows_x(x, bias, act):
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return (x, bias, act), {}


_library.register_autocast_casting("torchfast::bias_act_triton", _autocast_bias_follows_x)
_library.register_autocast_same_dtype("torchfast::bias_act_backward_triton")


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, *, act: str) -> torch.Tensor:
    """act(x + bias) with the Triton kernels, differentiable (backward saves x and bias); what
    `torchfast.bias_act(..., impl="triton")` runs."""
    return torch.ops.torchfast.bias_act_triton(x, bias, act)


__all__ = ["bias_act", "bias_act_bwd", "bias_act_fwd", "unavailable_reason"]
