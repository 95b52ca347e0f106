"""Reference rms_norm and add_rms_norm (pure PyTorch, differentiable; exact in float64), their backward
formulas, and the dtype rule of their autocast: what the native ops (torchfast/ops/rms_norm.py) and the
Triton operators (torchfast/triton/rms_norm.py) share. The formulas are in torchfast/ops/rms_norm.py.
"""

from __future__ import annotations

import torch

from torchfast.reference import _norm


def rms_norm_stats(x, weight, eps):
    """(y, rstd) in the math type, y rounded to x's dtype: the forward op's contract."""
    xf = x.to(_norm.stats_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype).contiguous(), rstd


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float | None = 1e-6):
    """y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in fp32 (fp64 for float64)."""
    return rms_norm_stats(x, weight, _norm.resolve_eps(eps, x))[0]


def add_rms_norm_reference(x, residual, weight=None, *, eps: float | None = 1e-6):
    """(rms_norm(h), h) with h = x + residual rounded to the activations' dtype, as unfused code does."""
    h = x + residual
    return rms_norm_reference(h, weight, eps=eps), h


def _rms_norm_backward_acc(grad_out, x, weight, rstd):
    """(dx in the math type, dw in weight's dtype or None)."""
    acc = _norm.stats_dtype(x.dtype)
    g, xf, r = grad_out.to(acc), x.to(acc), rstd.to(acc).unsqueeze(-1)
    gw = g if weight is None else g * weight.to(acc)
    dot = (gw * xf).sum(-1, keepdim=True)
    dx = r * gw - xf * (r.pow(3) * dot / x.shape[-1])
    dw = None if weight is None else (g * xf * r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw


def rms_norm_backward_reference(grad_out, x, weight, rstd):
    """(dx, dw) from the saved rstd (formulas: torchfast/ops/rms_norm.py); dw is None without a weight."""
    dx, dw = _rms_norm_backward_acc(grad_out, x, weight, rstd)
    return dx.to(x.dtype), dw


def add_rms_norm_backward_reference(grad_out, grad_h, h, weight, rstd):
    """(gradient of h, which x and residual both get; dw): rms_norm's dx plus grad_h, rounded once."""
    dh, dw = _rms_norm_backward_acc(grad_out, h, weight, rstd)
    if grad_h is not None:
        dh = dh + grad_h.to(dh.dtype)
    return dh.to(h.dtype), dw


def add_rms_norm_stats(x, residual, weight, eps):
    """(y, h, rstd): add_rms_norm's contract, h = x + residual rounded to the activations' dtype."""
    h = (x + residual).contiguous()
    y, rstd = rms_norm_stats(h, weight, eps)
    return y, h, rstd


# ---- autocast ---------------------------------------------------------------------------------------

def rms_norm_autocast_args(x, weight, eps):
    """rms_norm's arguments under autocast: activations as they are, weights cast only where the kernels
    would refuse them (see torchfast/reference/_norm.py, autocast_params)."""
    return (x, *_norm.autocast_params(x.dtype, weight), eps)


def add_rms_norm_autocast_args(x, residual, weight, eps):
    """add_rms_norm's arguments under autocast."""
    # h = x + residual has torch's promoted dtype (an fp32 residual stream plus a bf16 branch is fp32).
    dt = torch.promote_types(x.dtype, residual.dtype)
    x, residual = x.to(dt), residual.to(dt)
    return (x, residual, *_norm.autocast_params(dt, weight), eps)
