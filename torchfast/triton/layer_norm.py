"""layer_norm in Triton: the math, outputs and statistics of the native op (torchfast/ops/layer_norm.py),
for CUDA tensors (CPU tensors under TRITON_INTERPRET=1, for tests). Same structure as
torchfast/triton/rms_norm.py: one program per row forward (mean, then the variance around it), one
program per group of rows backward with the weight and bias gradients summed in registers; rows longer
than one block (torchfast/triton/_norm_rows.py) are walked in chunks, three sweeps forward and two for dx,
with the parameter gradients summed by _norm_param_grads_kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.reference import _norm
from torchfast.reference.layer_norm import layer_norm_autocast_args, layer_norm_backward_reference
from torchfast.triton import _norm_rows, row_grid
from torchfast.triton.rms_norm import _absent_to_none, _no_grad, check_rows


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n, eps, HAS_W: tl.constexpr,
                           HAS_B: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0)
    if not F64:
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        if not F64:
            w = w.to(tl.float32)
        y = y * w
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
        if not F64:
            b = b.to(tl.float32)
        y = y + b
    tl.store(y_ptr + row * n + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, pdw_ptr, pdb_ptr, rows, n,
                           rows_per_prog, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
                           BLOCK: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if F64:
        acc_dw = tl.zeros([BLOCK], dtype=tl.float64)
        acc_db = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc_dw = tl.zeros([BLOCK], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK], dtype=tl.float32)
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
        if not F64:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        m = tl.load(mean_ptr + row)
        r = tl.load(rstd_ptr + row)
        xc = tl.where(mask, x - m, 0.0)
        if HAS_W:
            gw = g * w
        else:
            gw = g
        c0 = -r * tl.sum(gw, axis=0) / n
        c1 = r * r * r * tl.sum(gw * xc, axis=0) / n
        dx = r * gw + c0 - xc * c1
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_dw += g * xc * r
        acc_db += g
    if WANT_DW:
        tl.store(pdw_ptr + pid * n + offs, acc_dw, mask=mask)
    if WANT_DB:
        tl.store(pdb_ptr + pid * n + offs, acc_db, mask=mask)


@triton.jit
def _load_x(x_ptr, offs, mask, F64: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if not F64:
        x = x.to(tl.float32)
    return x


@triton.jit
def _layer_norm_fwd_long_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n, eps, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, BLOCK: tl.constexpr, F64: tl.constexpr):
    """_layer_norm_fwd_kernel for rows longer than one block: sweeps for the mean, the variance around
    it, and y."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cols = tl.arange(0, BLOCK)
    if F64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        acc2 = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        acc += _load_x(x_ptr, base + start + cols, start + cols < n, F64)
    mean = tl.sum(acc, axis=0) / n
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        xc = tl.where(mask, _load_x(x_ptr, base + start + cols, mask, F64) - mean, 0.0)
        acc2 += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / n + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        y = (_load_x(x_ptr, base + start + cols, mask, F64) - mean) * rstd
        if HAS_W:
            y = y * _load_x(w_ptr, start + cols, mask, F64)
        if HAS_B:
            y = y + _load_x(b_ptr, start + cols, mask, F64)
        tl.store(y_ptr + base + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_long_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, n, HAS_W: tl.constexpr,
                                BLOCK: tl.constexpr, F64: tl.constexpr):
    """dx of _layer_norm_bwd_kernel for rows longer than one block, one program per row: a sweep for
    sum(g w) and sum(g w (x - m)), a sweep for dx. The parameter gradients are _norm_param_grads_kernel's."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cols = tl.arange(0, BLOCK)
    m = tl.load(mean_ptr + row)
    r = tl.load(rstd_ptr + row)
    if F64:
        acc0 = tl.zeros([BLOCK], dtype=tl.float64)
        acc1 = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        gw = _load_x(g_ptr, base + start + cols, mask, F64)
        if HAS_W:
            gw = gw * _load_x(w_ptr, start + cols, mask, F64)
        xc = tl.where(mask, _load_x(x_ptr, base + start + cols, mask, F64) - m, 0.0)
        acc0 += gw
        acc1 += gw * xc
    c0 = -r * tl.sum(acc0, axis=0) / n
    c1 = r * r * r * tl.sum(acc1, axis=0) / n
    for start in range(0, n, BLOCK):
        mask = start + cols < n
        gw = _load_x(g_ptr, base + start + cols, mask, F64)
        if HAS_W:
            gw = gw * _load_x(w_ptr, start + cols, mask, F64)
        xc = _load_x(x_ptr, base + start + cols, mask, F64) - m
        dx = r * gw + c0 - xc * c1
        tl.store(dx_ptr + base + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) by `_layer_norm_fwd_kernel`: the native torchfast::layer_norm's outputs."""
    n = check_rows(x, "layer_norm")
    _norm.check_args("layer_norm", x, eps, {"weight": weight, "bias": bias})
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=_norm.stats_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    rows = y.numel() // n
    if rows:
        meta = _norm_rows.launch_meta(n)
        kernel = _layer_norm_fwd_kernel if meta["single"] else _layer_norm_fwd_long_kernel
        wrap_triton(kernel)[row_grid(rows, "layer_norm")](
            xc, weight.contiguous() if weight is not None else xc, bias.contiguous() if bias is not None else xc,
            y, mean, rstd, n, eps, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=meta["BLOCK"],
            F64=x.dtype == torch.float64, num_warps=meta["num_warps"])
    return y, mean, rstd


def layer_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) by `_layer_norm_bwd_kernel`: the native layer_norm_backward's outputs, with an empty
    tensor for the gradient of an absent parameter (triton_op cannot return an optional Tensor)."""
    n = check_rows(x, "layer_norm_backward")
    if grad_out.shape != x.shape:
        raise RuntimeError(f"torchfast.layer_norm_backward: 'grad_out' has shape {tuple(grad_out.shape)} but "
                           f"'x' has shape {tuple(x.shape)}; they must match")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = dx.numel() // n
    if rows == 0:
        return (dx, _no_grad(x) if weight is None else torch.zeros_like(weight),
                _no_grad(x) if bias is None else torch.zeros_like(bias))
    meta = _norm_rows.launch_meta(n)
    f64 = x.dtype == torch.float64
    xc, gc = x.contiguous(), grad_out.contiguous()
    wc = weight.contiguous() if weight is not None else xc
    mc, rc = mean.contiguous(), rstd.contiguous()
    if not meta["single"]:
        wrap_triton(_layer_norm_bwd_long_kernel)[row_grid(rows, "layer_norm_backward")](
            gc, xc, wc, mc, rc, dx, n, HAS_W=weight is not None, BLOCK=meta["BLOCK"], F64=f64,
            num_warps=meta["num_warps"])
        dw = db = None
        if weight is not None or bias is not None:
            dw, db = _norm_rows.param_grads(gc.view(rows, n), xc.view(rows, n), mc.view(rows), rc.view(rows),
                                            want_dw=weight is not None, want_db=bias is not None)
        return (dx, _no_grad(x) if dw is None else dw.to(weight.dtype),
                _no_grad(x) if db is None else db.to(bias.dtype))
    programs, per_prog = _norm_rows.group_programs(rows, x.device)
    acc = _norm.stats_dtype(x.dtype)
    pdw = torch.empty((programs, n), dtype=acc, device=x.device) if weight is not None else None
    pdb = torch.empty((programs, n), dtype=acc, device=x.device) if bias is not None else None
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        gc, xc, wc, mc, rc, dx, pdw if pdw is not None else dx, pdb if pdb is not None else dx, rows, n, per_prog,
        HAS_W=weight is not None, WANT_DW=pdw is not None, WANT_DB=pdb is not None, BLOCK=meta["BLOCK"],
        F64=f64, num_warps=meta["num_warps"])
    return (dx, _no_grad(x) if pdw is None else pdw.sum(0).to(weight.dtype),
            _no_grad(x) if pdb is None else pdb.sum(0).to(bias.dtype))


layer_norm_triton = triton_op("torchfast::layer_norm_triton", layer_norm_fwd, mutates_args=())
layer_norm_backward_triton = triton_op("torchfast::layer_norm_backward_triton", layer_norm_bwd, mutates_args=())


def _setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx = dw = db = None
    if grad_y is not None:
        dx, dw, db = torch.ops.torchfast.layer_norm_backward_triton(grad_y, x, weight, bias, mean, rstd)
        dw, db = _absent_to_none(dw, weight), _absent_to_none(db, bias)
    if grad_mean is not None:
        dx = _norm.add_grad(dx, (grad_mean / x.shape[-1]).unsqueeze(-1).expand(x.shape), x.dtype)
    if grad_rstd is not None:
        dx = _norm.add_grad(dx, _norm.rstd_grad_term(grad_rstd, rstd, x.to(mean.dtype) - mean.unsqueeze(-1)),
                            x.dtype)
    return dx, dw, db, None


def _setup_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _backward_bwd(ctx, grad_dx, grad_dw, grad_db):
    saved = ctx.saved_tensors
    grad_dw = None if saved[2] is None else grad_dw
    grad_db = None if saved[3] is None else grad_db
    return _norm.vjp_backward(layer_norm_backward_reference, saved, (grad_dx, grad_dw, grad_db))


layer_norm_triton.register_autograd(_backward, setup_context=_setup)
layer_norm_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_bwd)
_norm.register_autocast("torchfast::layer_norm_triton", layer_norm_autocast_args)
_library.register_autocast_same_dtype("torchfast::layer_norm_backward_triton")


def layer_norm(x, weight=None, bias=None, *, eps=1e-5):
    """What torchfast.layer_norm(..., impl="triton") runs: differentiable, saves x, mean and rstd."""
    return torch.ops.torchfast.layer_norm_triton(x, weight, bias, eps)[0]
