"""Reference layer_norm (pure PyTorch, differentiable; exact in float64), its backward formula, and the
dtype rule of its autocast: what the native op (torchfast/ops/layer_norm.py) and the Triton operator
(torchfast/triton/layer_norm.py) share. The formulas are in torchfast/ops/layer_norm.py.
"""

from __future__ import annotations

import torch

from torchfast.reference import _norm


def layer_norm_stats(x, weight, bias, eps):
    """(y, mean, rstd): the forward op's contract, in the math type, y rounded to x's dtype."""
    xf = x.to(_norm.stats_dtype(x.dtype))
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype).contiguous(), mean, rstd


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         *, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension, in fp32 (fp64 for
    float64)."""
    return layer_norm_stats(x, weight, bias, eps)[0]


def layer_norm_backward_reference(grad_out, x, weight, bias, mean, rstd):
    """(dx, dw, db) from the saved statistics; dw / db are None without weight / bias."""
    acc = _norm.stats_dtype(x.dtype)
    n = x.shape[-1]
    g, r = grad_out.to(acc), rstd.to(acc).unsqueeze(-1)
    xc = x.to(acc) - mean.to(acc).unsqueeze(-1)
    gw = g if weight is None else g * weight.to(acc)
    s1 = gw.sum(-1, keepdim=True)
    s2 = (gw * xc).sum(-1, keepdim=True)
    dx = r * gw - r * s1 / n - xc * (r.pow(3) * s2 / n)
    dw = None if weight is None else (g * xc * r).reshape(-1, n).sum(0).to(weight.dtype)
    db = None if bias is None else g.reshape(-1, n).sum(0).to(bias.dtype)
    return dx.to(x.dtype), dw, db


def layer_norm_autocast_args(x, weight, bias, eps):
    """layer_norm's arguments under autocast: activations as they are, weight and bias cast only where
    the kernels would refuse them (see torchfast/reference/_norm.py, autocast_params)."""
    return (x, *_norm.autocast_params(x.dtype, weight, bias), eps)
