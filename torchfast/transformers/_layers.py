"""What the patched parts of a transformers model compute: torchfast ops in place of the modules' own
forward methods.

Two kinds. The `*Layer` classes are kernel layers in the `kernels` package's sense: stateless
nn.Module subclasses (no __init__, no members besides forward and the two capability flags) whose
forward has the signature of the layer they stand in for. `kernelize` binds their forward to each
module instance it swaps (`module.forward = MethodType(Layer.forward, module)`), so inside forward
`self` is the transformers module with its own parameters and attributes. The `*_forward` functions
are bound the same way by torchfast itself, for the parts transformers has no kernel hook for.
Either way the module object, its class, its parameters and its state_dict are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from torchfast.nn._glu_down import glu_down, project
from torchfast.ops.bias_act import bias_act
from torchfast.ops.layer_norm import layer_norm
from torchfast.ops.linear import linear
from torchfast.ops.rms_norm import rms_norm
from torchfast.ops.rope import rope


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    raise AttributeError(f"torchfast.transformers: {type(module).__name__} has no epsilon attribute")


class RMSNormLayer(nn.Module):
    """Kernel layer for transformers' `RMSNorm` hook (LlamaRMSNorm and its copies):
    y = weight * (x / sqrt(mean(x^2) + eps)), statistics in float32.

    transformers rounds the normalized x to the input dtype and then multiplies by the weight, so the
    result has the promoted dtype of x and weight (float32 for bfloat16 x with a float32 weight); the
    fused op rounds once, after the multiply, and the result is cast to that same promoted dtype."""

    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        y = rms_norm(hidden_states, weight, eps=_eps(self))
        out_dtype = torch.promote_types(hidden_states.dtype, weight.dtype)
        return y if y.dtype == out_dtype else y.to(out_dtype)


class RotaryLayer(nn.Module):
    """Kernel layer for transformers' `rotary_pos_emb` hook (`apply_rotary_pos_emb(q, k, cos, sin,
    unsqueeze_dim=1)`): q and k rotated by torchfast.rope in one pass (partial rotary when cos/sin are
    narrower than the head). The results keep q's and k's dtype; transformers' composite promotes them
    to cos's dtype (float32 for bfloat16 q with a float32 cache), which attention casts back anyway."""

    can_torch_compile = True
    has_backward = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' module-level `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` by
    torchfast.rope, for the attentions that call it without a kernel hook (Phi-3): what
    `RotaryLayer.forward` computes, partial rotary included (cos/sin narrower than the head: the rest
    of the head passes through, as Phi-3's own function does)."""
    return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def offset_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * (1 + weight), in float32, returned in x's
    dtype. `1 + weight` is a [hidden] tensor built per call; its gradient flows to weight."""
    scale = 1.0 + self.weight.float()
    return rms_norm(x, scale if x.dtype != torch.float64 else scale.double(), eps=_eps(self)).to(x.dtype)


def layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm over the last dimension (GPT-2's ln_1, ln_2, ln_f) by torchfast.layer_norm."""
    return layer_norm(x, self.weight, self.bias, eps=self.eps)


def gated_mlp_forward(act: str):
    """down_proj(act(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen, Gemma MLPs): the fused glu
    between the projections, the product recomputed in backward (torchfast/nn/_glu_down.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return glu_down(project(self.gate_proj, x), project(self.up_proj, x), self.down_proj, act)

    return forward


def packed_mlp_forward(act: str):
    """Phi-3's MLP: gate, up = gate_up_proj(x).chunk(2); down_proj(up * act(gate))."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, hidden_states).chunk(2, dim=-1)
        return glu_down(gate, up, self.down_proj, act)

    return forward


def linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward by torchfast.ops.linear: F.linear's contract, with the float32 CPU GEMMs in
    oneDNN where that is the faster library (under autocast, export or tracing it is F.linear)."""
    return linear(input, self.weight, self.bias)


def conv1d_mlp_forward(act: str):
    """GPT-2's MLP: dropout(c_proj(act(x @ c_fc.weight + c_fc.bias))) with the bias add and the
    activation fused (transformers' Conv1D keeps its weight as [in, out])."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states @ self.c_fc.weight
        h = bias_act(h, self.c_fc.bias.to(h.dtype), act=act)
        return self.dropout(self.c_proj(h))

    return forward
