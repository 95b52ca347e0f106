"""down_proj(glu(gate, up)) without keeping the product alive for backward.

In a gated MLP, autograd normally keeps three intermediate-wide tensors per layer: gate and up (for
the glu backward) and the product h = act(gate) * up (the down projection's input, for its weight
gradient). h is cheap to recompute from gate and up, so `glu_down` saves only gate and up and
recomputes h in backward: a third less activation memory for the MLP, at the cost of one elementwise
pass, with no matmul recomputed (unlike checkpointing the whole projection).

It runs only where that is safe to do behind the user's back, and falls back to the plain
`down(glu(gate, up))` otherwise: `down` must be a plain nn.Linear with plain tensor parameters and no
hooks (pruning reparametrizations, quantized weights, forward hooks of torchfast.hooks or the user's
must see the call), the glu must run the native kernels, and autograd must be recording (eval,
no_grad, tracing and export take the plain path, so exported graphs are the ordinary ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from torchfast._registry import select
from torchfast._util import has_hooks
from torchfast.ops import glu as glu_ops
from torchfast.ops import linear as linear_ops

_ACTS = ("swish", "gelu", "gelu_tanh")


def _glu(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if act == "swish":
        return glu_ops.swiglu(gate, up)
    return glu_ops.geglu(gate, up, approximate="tanh" if act == "gelu_tanh" else "none")


def _glu_native(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The native kernel itself (glu_down checked that the registry picks it): no selection logic
    inside the autograd.Function, which torch.compile traces in its strict mode."""
    if act == "swish":
        return torch.ops.torchfast.swiglu(gate, up)
    return torch.ops.torchfast.geglu(gate, up, approximate="tanh" if act == "gelu_tanh" else "none")


def _plain_linear(m: nn.Module) -> bool:
    """A module whose call is exactly F.linear(x, m.weight, m.bias): nothing else would observe it."""
    if type(m) is not nn.Linear:
        return False
    if has_hooks(m):
        return False
    g = nn.modules.module
    if g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks:
        return False
    return all(p is None or type(p) is nn.Parameter for p in (m.weight, m.bias))


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a gated MLP's projection: a plain nn.Linear runs as `torchfast.ops.linear` (oneDNN's
    GEMM where that is the faster one), anything else (hooked, pruned, quantized) through its own call."""
    if _plain_linear(m):
        return linear_ops.linear(x, m.weight, m.bias)
    return m(x)


def _recording(*tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return False
    return True


class _GluDown(torch.autograd.Function):
    """y = F.linear(glu(gate, up), weight, bias), saving gate and up only."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act, onednn):
        h = _glu_native(act, gate, up)
        if onednn:  # decided by glu_down (linear_ops.eligible)
            y = torch.ops.torchfast._onednn_linear(h, weight, bias)
        else:
            y = F.linear(h, weight, bias)  # under autocast: in the autocast dtype, as nn.Linear would
        ctx.save_for_backward(gate, up, weight)
        ctx.act = act
        ctx.onednn = onednn
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        gate, up, weight = ctx.saved_tensors
        h = _glu_native(ctx.act, gate, up)  # recomputed (no autograd: backward runs with grad mode off)
        # The matmuls run in grad_y's dtype: the dtype F.linear computed in (autocast's, if it was on);
        # the parameter gradients come back in the parameters' dtypes, as autocast's casts would give.
        cdt = grad_y.dtype
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.onednn:
            grad_h = torch.ops.torchfast._onednn_linear(grad_y, weight.t(), None)
        else:
            grad_h = (grad_y @ weight.to(cdt)).to(gate.dtype)
        grad_w = (gy.t() @ h.reshape(-1, h.shape[-1]).to(cdt)).to(weight.dtype)
        acc = torch.promote_types(cdt, torch.float32)  # bf16/fp16 gradients summed in float32
        grad_b = gy.sum(0, dtype=acc).to(ctx.bias_dtype) if ctx.has_bias else None
        if ctx.act == "swish":
            grad_gate, grad_up = torch.ops.torchfast.swiglu_backward(grad_h, gate, up)
        else:
            approx = "tanh" if ctx.act == "gelu_tanh" else "none"
            grad_gate, grad_up = torch.ops.torchfast.geglu_backward(grad_h, gate, up, approximate=approx)
        return grad_gate, grad_up, grad_w, grad_b, None, None


def glu_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, act: str) -> torch.Tensor:
    """down(glu(gate, up)) with glu = swiglu (act="swish") or geglu ("gelu", "gelu_tanh"); the same
    values and gradients as the plain composition, with h recomputed in backward where safe (see the
    module docstring)."""
    if act not in _ACTS:
        raise ValueError(f"torchfast.nn glu_down: argument 'act' must be one of {_ACTS}, got {act!r}")
    spec = glu_ops.SWIGLU if act == "swish" else glu_ops.GEGLU
    fused = (
        _plain_linear(down)
        and _recording(gate, up, down.weight)
        and gate.shape == up.shape
        and select(spec, (gate, up), None).name == "native"
    )
    if not fused:
        return project(down, _glu(act, gate, up))
    onednn = linear_ops.eligible(gate, down.weight, down.bias)  # gate: h's shape, dtype and device
    return _GluDown.apply(gate, up, down.weight, down.bias, act, onednn)
