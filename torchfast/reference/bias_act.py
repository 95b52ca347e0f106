"""Reference bias_act (pure PyTorch, differentiable; exact in float64), its backward and double-backward
formulas: what the native op (torchfast/ops/bias_act.py) and the Triton operator
(torchfast/triton/bias_act.py) share. The activations' math is torchfast/reference/_activations.py.
"""

from __future__ import annotations

import torch

from torchfast.reference._activations import act_fn, act_grad, act_grad2


def bias_act_reference(x: torch.Tensor, bias: torch.Tensor | None, *, act: str) -> torch.Tensor:
    """Pure-PyTorch bias_act, differentiable by autograd; exact for float64 inputs."""
    return act_fn(act, x if bias is None else x + bias)


def bias_act_backward_reference(grad_out, x, bias, *, act):
    """(dx, dbias): dx = grad_out * act'(x + bias), dbias = dx summed over the leading dimensions."""
    dx = grad_out * act_grad(act, x if bias is None else x + bias)
    db = x.new_empty((0,)) if bias is None else dx.reshape(-1, x.shape[-1]).sum(0)
    return dx, db


def bias_act_double_backward(first, act, grad_out, x, bias, grad_dx, grad_db):
    """Gradients of bias_act_backward's (dx, dbias) = (grad_out act'(p), sum dx), p = x + bias, given
    upstream (grad_dx, grad_db). dbias = sum dx, so the upstream gradient of dx is G = grad_dx + grad_db
    (broadcast); then d/dgrad_out = G act'(p) = first(G) (the backward op's dx for grad_out = G),
    d/dx = G grad_out act''(p), d/dbias = d/dx summed over the leading dimensions."""
    g = grad_dx if grad_dx is not None else torch.zeros_like(x)
    if bias is not None and grad_db is not None:
        g = g + grad_db
    pre = x if bias is None else x + bias
    d_x = g * grad_out * act_grad2(act, pre)
    d_bias = None if bias is None else d_x.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)
    return first(g), d_x, d_bias
