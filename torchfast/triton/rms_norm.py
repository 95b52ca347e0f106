"""rms_norm and add_rms_norm in Triton: the math, outputs and statistics of the native ops
(torchfast/ops/rms_norm.py), for CUDA tensors (CPU tensors under TRITON_INTERPRET=1, for tests).

    _rms_norm_fwd_kernel   one program per row; h = x + residual first when HAS_RES
    _rms_norm_bwd_kernel   one program per group of rows: dx per row, and the group's weight-gradient
                           partial sum kept in registers, stored once per program
    _rms_norm_fwd_long_kernel, _rms_norm_bwd_long_kernel
                           the same for rows longer than one block (torchfast/triton/_norm_rows.py): the
                           row walked in chunks; the weight gradient by _norm_param_grads_kernel
    rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd          launchers (checks, outputs, launch)
    torchfast::rms_norm_triton, add_rms_norm_triton,
    rms_norm_backward_triton                                triton_ops with autograd
    rms_norm(x, weight, eps), add_rms_norm(x, residual, weight, eps)   what impl="triton" runs

Rows up to _norm_rows.SINGLE_BLOCK_MAX elements are held in one block (BLOCK = next power of two >= n),
longer ones are walked in chunks, so any row length works; num_warps follows the block size. Statistics
and math are fp32 (fp64 for float64), bf16/fp16 are rounded once on store, a bf16/fp16 x
may come with an fp32 weight (AMP), and rstd is returned in fp32 (fp64), as the native ops do. The
weight gradient is summed over rows in fp32 per program, then over programs (no atomics).

As for swish (torchfast/triton/swish.py): under the interpreter the operators work eagerly; tracing
them (opcheck's fake tensors, torch.compile) only works on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.reference import _norm
from torchfast.reference.rms_norm import (
    add_rms_norm_autocast_args,
    add_rms_norm_backward_reference,
    rms_norm_autocast_args,
    rms_norm_backward_reference,
)
from torchfast.triton import _norm_rows, row_grid, unavailable_reason

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, n, eps, HAS_RES: tl.constexpr,
                         HAS_W: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    base = row * n
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + base + offs, mask=mask, other=0.0)
        if F64:
            h = x + r
        else:
            h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)  # rounded, as returned
        tl.store(h_ptr + base + offs, h, mask=mask)
        x = h
    if F64:
        xc = x
    else:
        xc = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        if F64:
            y = y * w
        else:
            y = y * w.to(tl.float32)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, gs_ptr, dx_ptr, pdw_ptr, rows, n, rows_per_prog,
                         HAS_W: tl.constexpr, HAS_GS: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if F64:
        acc_dw = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc_dw = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        if not F64:
            w = w.to(tl.float32)
    first = pid * rows_per_prog
    last = tl.minimum(first + rows_per_prog, rows)
    # Counted from `first` (int64), not `for row in range(first, last)`: the row index then stays int64 in
    # Triton's interpreter too, which iterates Python ints and would multiply them by n in int32.
    for i in range(0, last - first):
        row = first + i
        base = row * n
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        r = tl.load(rstd_ptr + row)
        if not F64:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        if HAS_W:
            gw = g * w
        else:
            gw = g
        coef = r * r * r * tl.sum(gw * x, axis=0) / n
        dx = r * gw - coef * x
        if HAS_GS:
            gs = tl.load(gs_ptr + base + offs, mask=mask, other=0.0)
            if F64:
                dx = dx + gs
            else:
                dx = dx + gs.to(tl.float32)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_dw += g * x * r
    if HAS_W:
        tl.store(pdw_ptr + pid * n + offs, acc_dw, mask=mask)


@triton.jit
def _load_h(x_ptr, res_ptr, h_ptr, offs, mask, HAS_RES: tl.constexpr, STORE_H: tl.constexpr, F64: tl.constexpr):
    """x, or h = x + residual rounded to x's dtype (what add_rms_norm returns; stored when STORE_H), in the
    math type. The long-row forward recomputes h in its second sweep instead of reading back the h it
    stored: the same value, and no thread then depends on a store made by another thread of the program."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        if F64:
            v = v + r
        else:
            v = (v.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + offs, v, mask=mask)
    if not F64:
        v = v.to(tl.float32)
    return v


@triton.jit
def _rms_norm_fwd_long_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, n, eps, HAS_RES: tl.constexpr,
                              HAS_W: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """_rms_norm_fwd_kernel for rows longer than one block: a sweep for sum(h^2), a sweep for y."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cols = tl.arange(0, BLOCK)
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        v = _load_h(x_ptr, res_ptr, h_ptr, base + start + cols, mask, HAS_RES, True, F64)
        acc += v * v
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        y = _load_h(x_ptr, res_ptr, h_ptr, base + start + cols, mask, HAS_RES, False, F64) * rstd
        if HAS_W:
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0)
            if not F64:
                w = w.to(tl.float32)
            y = y * w
        tl.store(y_ptr + base + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_gw_x(g_ptr, x_ptr, w_ptr, base, cols, mask, HAS_W: tl.constexpr, F64: tl.constexpr):
    """(g * w, x) at columns `cols` of the row starting at `base`, in the math type (g alone without w)."""
    g = tl.load(g_ptr + base + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
    if not F64:
        g = g.to(tl.float32)
        x = x.to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if not F64:
            w = w.to(tl.float32)
        g = g * w
    return g, x


@triton.jit
def _rms_norm_bwd_long_kernel(g_ptr, x_ptr, w_ptr, rstd_ptr, gs_ptr, dx_ptr, n, HAS_W: tl.constexpr,
                              HAS_GS: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """dx of _rms_norm_bwd_kernel for rows longer than one block, one program per row: a sweep for
    sum(g w x), a sweep for dx. The weight gradient is _norm_param_grads_kernel's."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cols = tl.arange(0, BLOCK)
    r = tl.load(rstd_ptr + row)
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        gw, x = _load_gw_x(g_ptr, x_ptr, w_ptr, base, start + cols, mask, HAS_W, F64)
        acc += gw * x
    coef = r * r * r * tl.sum(acc, axis=0) / n
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        gw, x = _load_gw_x(g_ptr, x_ptr, w_ptr, base, start + cols, mask, HAS_W, F64)
        dx = r * gw - coef * x
        if HAS_GS:
            gs = tl.load(gs_ptr + base + start + cols, mask=mask, other=0.0)
            if F64:
                dx = dx + gs
            else:
                dx = dx + gs.to(tl.float32)
        tl.store(dx_ptr + base + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check(t: torch.Tensor, op: str, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"torchfast.{op}: argument '{arg}' must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"torchfast.{op}: argument '{arg}' has dtype {t.dtype}; "
                        "supported dtypes are float32, float64, bfloat16 and float16")
    why = unavailable_reason(t.device.type)
    if why:
        raise RuntimeError(f"torchfast.{op} (triton): argument '{arg}' is on {t.device}: {why}")


def check_rows(x: torch.Tensor, op: str) -> int:
    """The row length, after the checks the native ops make (any length: long rows take the chunked path)."""
    _check(x, op, "x")
    return x.shape[-1] if x.dim() else 0


def _fwd(op: str, x, residual, weight, eps):
    n = check_rows(x, op)
    _norm.check_args(op, x, eps, {"weight": weight})
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=_norm.stats_dtype(x.dtype), device=x.device)
    rows = y.numel() // n
    if rows:
        meta = _norm_rows.launch_meta(n)
        kernel = _rms_norm_fwd_kernel if meta["single"] else _rms_norm_fwd_long_kernel
        wrap_triton(kernel)[row_grid(rows, op)](
            xc, residual.contiguous() if residual is not None else xc, weight if weight is not None else xc,
            y, h if h is not None else y, rstd, n, eps, HAS_RES=residual is not None, HAS_W=weight is not None,
            BLOCK=meta["BLOCK"], F64=x.dtype == torch.float64, num_warps=meta["num_warps"])
    return y, h, rstd


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) by `_rms_norm_fwd_kernel`: the native torchfast::rms_norm's outputs. Not differentiable."""
    y, _, rstd = _fwd("rms_norm", x, None, weight.contiguous() if weight is not None else None, eps)
    return y, rstd


def add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd) of add_rms_norm by `_rms_norm_fwd_kernel`. Not differentiable."""
    _check(residual, "add_rms_norm", "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise RuntimeError(f"torchfast.add_rms_norm: 'residual' ({tuple(residual.shape)}, {residual.dtype}) must "
                           f"match 'x' ({tuple(x.shape)}, {x.dtype})")
    return _fwd("add_rms_norm", x, residual, weight.contiguous() if weight is not None else None, eps)


def rms_norm_bwd(grad_out: torch.Tensor, grad_h: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (+ grad_h), dw) by `_rms_norm_bwd_kernel`: the native rms_norm_backward's outputs, except that
    without a weight dw is an empty tensor (triton_op's schemas cannot return an optional Tensor)."""
    n = check_rows(x, "rms_norm_backward")
    if grad_out.shape != x.shape:
        raise RuntimeError(f"torchfast.rms_norm_backward: 'grad_out' has shape {tuple(grad_out.shape)} but 'x' has "
                           f"shape {tuple(x.shape)}; they must match")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = dx.numel() // n
    acc = _norm.stats_dtype(x.dtype)
    if rows == 0:
        return dx, _no_grad(x) if weight is None else torch.zeros_like(weight)
    meta = _norm_rows.launch_meta(n)
    xc, gc = x.contiguous(), grad_out.contiguous()
    wc = weight.contiguous() if weight is not None else xc
    gs = grad_h.contiguous() if grad_h is not None else xc
    if not meta["single"]:
        wrap_triton(_rms_norm_bwd_long_kernel)[row_grid(rows, "rms_norm_backward")](
            gc, xc, wc, rstd.contiguous(), gs, dx, n, HAS_W=weight is not None, HAS_GS=grad_h is not None,
            BLOCK=meta["BLOCK"], F64=x.dtype == torch.float64, num_warps=meta["num_warps"])
        if weight is None:
            return dx, _no_grad(x)
        dw, _ = _norm_rows.param_grads(gc.view(rows, n), xc.view(rows, n), None, rstd.contiguous().view(rows),
                                       want_dw=True, want_db=False)
        return dx, dw.to(weight.dtype)
    # Enough programs to fill a GPU; each sums the weight gradient of its rows in registers.
    programs, per_prog = _norm_rows.group_programs(rows, x.device)
    partial = torch.empty((programs, n), dtype=acc, device=x.device) if weight is not None else None
    wrap_triton(_rms_norm_bwd_kernel)[(programs,)](
        gc, xc, wc, rstd.contiguous(), gs, dx, partial if partial is not None else dx,
        rows, n, per_prog, HAS_W=weight is not None, HAS_GS=grad_h is not None, BLOCK=meta["BLOCK"],
        F64=x.dtype == torch.float64, num_warps=meta["num_warps"])
    return dx, _no_grad(x) if partial is None else partial.sum(0).to(weight.dtype)


def _no_grad(x: torch.Tensor) -> torch.Tensor:
    """The placeholder for an absent parameter's gradient."""
    return x.new_empty((0,))


def _absent_to_none(grad: torch.Tensor, param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else grad


# Schemas from the type hints: (Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor), ...
rms_norm_triton = triton_op("torchfast::rms_norm_triton", rms_norm_fwd, mutates_args=())
add_rms_norm_triton = triton_op("torchfast::add_rms_norm_triton", add_rms_norm_fwd, mutates_args=())
rms_norm_backward_triton = triton_op("torchfast::rms_norm_backward_triton", rms_norm_bwd, mutates_args=())


def _setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx = dw = None
    if grad_y is not None:
        dx, dw = torch.ops.torchfast.rms_norm_backward_triton(grad_y, None, x, weight, rstd)
        dw = _absent_to_none(dw, weight)
    if grad_rstd is not None:
        dx = _norm.add_grad(dx, _norm.rstd_grad_term(grad_rstd, rstd, x), x.dtype)
    return dx, dw, None


def _setup_add(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.set_materialize_grads(False)


def _backward_add(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dw = grad_h, None
    if grad_y is not None:
        dh, dw = torch.ops.torchfast.rms_norm_backward_triton(grad_y, grad_h, h, weight, rstd)
        dw = _absent_to_none(dw, weight)
    if grad_rstd is not None:
        dh = _norm.add_grad(dh, _norm.rstd_grad_term(grad_rstd, rstd, h), h.dtype)
    return dh, dh, dw, None


def _setup_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _backward_bwd(ctx, grad_dx, grad_dw):
    """Double backward from the reference backward (see torchfast/reference/_norm.py, vjp_backward)."""
    grad_out, grad_h, x, weight, rstd = ctx.saved_tensors
    grad_dw = _absent_to_none(grad_dw, weight) if grad_dw is not None else None
    if grad_h is None:
        g_go, g_x, g_w, g_r = _norm.vjp_backward(rms_norm_backward_reference, (grad_out, x, weight, rstd),
                                                 (grad_dx, grad_dw))
        return g_go, None, g_x, g_w, g_r
    return _norm.vjp_backward(add_rms_norm_backward_reference, (grad_out, grad_h, x, weight, rstd),
                              (grad_dx, grad_dw))


rms_norm_triton.register_autograd(_backward, setup_context=_setup)
add_rms_norm_triton.register_autograd(_backward_add, setup_context=_setup_add)
rms_norm_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_bwd)
# The native ops' autocast rules: activations as they are, weights cast only where refused.
_norm.register_autocast("torchfast::rms_norm_triton", rms_norm_autocast_args)
_norm.register_autocast("torchfast::add_rms_norm_triton", add_rms_norm_autocast_args)
_library.register_autocast_same_dtype("torchfast::rms_norm_backward_triton")


def rms_norm(x, weight=None, *, eps=1e-6):
    """What torchfast.rms_norm(..., impl="triton") runs: differentiable, saves x and rstd."""
    return torch.ops.torchfast.rms_norm_triton(x, weight, eps)[0]


def add_rms_norm(x, residual, weight=None, *, eps=1e-6):
    """What torchfast.add_rms_norm(..., impl="triton") runs: (y, h), saves h and rstd."""
    y, h, _ = torch.ops.torchfast.add_rms_norm_triton(x, residual, weight, eps)
    return y, h
