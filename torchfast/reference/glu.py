"""Reference swiglu and geglu (pure PyTorch, differentiable; exact in float64), their backward and
double-backward formulas: what the native ops (torchfast/ops/glu.py) and the Triton operators
(torchfast/triton/glu.py) share. The activations' math is torchfast/reference/_activations.py.
"""

from __future__ import annotations

import torch

from torchfast.reference._activations import act_fn, act_grad, act_grad2, gelu_act


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch swiglu (packed when up is None), differentiable by autograd."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return act_fn("swish", gate) * up


def geglu_reference(
    gate: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none"
) -> torch.Tensor:
    """Pure-PyTorch geglu (packed when up is None), differentiable by autograd."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return act_fn(gelu_act(approximate, "geglu"), gate) * up


def glu_backward_reference(grad_out, gate, up, *, act):
    """(d_gate, d_up) = (grad_out * up * act'(gate), grad_out * act(gate))."""
    return grad_out * up * act_grad(act, gate), grad_out * act_fn(act, gate)


def glu_double_backward(act, grad_out, gate, up, g_gate, g_up):
    """Gradients of (d_gate, d_up) = (go u a'(g), go a(g)) given upstream (G_gate, G_up):
    d/dgo = G_gate u a' + G_up a,  d/dgate = G_gate go u a'' + G_up go a',  d/dup = G_gate go a'."""
    zeros = torch.zeros_like(gate)
    g_gate = zeros if g_gate is None else g_gate
    g_up = zeros if g_up is None else g_up
    a, d1, d2 = act_fn(act, gate), act_grad(act, gate), act_grad2(act, gate)
    return (
        g_gate * up * d1 + g_up * a,
        g_gate * grad_out * up * d2 + g_up * grad_out * d1,
        g_gate * grad_out * d1,
    )
