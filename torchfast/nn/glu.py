"""Gated MLPs of LLM blocks: down_proj(act(gate_proj(x)) * up_proj(x)), with the fused swiglu / geglu
op between the projections. Submodule names follow the common LLM MLP (Llama, Mistral, Qwen, Gemma),
so their checkpoints load unchanged."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.nn._glu_down import glu_down, project
from torchfast.ops._activations import gelu_act


class _GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)


class SwiGLU(_GatedMLP):
    """down_proj(swish(gate_proj(x)) * up_proj(x)) (Shazeer 2020); the gate activation and product are one
    fused op. In training, autograd keeps only the two projections' outputs: the product, which
    down_proj would keep, is recomputed in backward (torchfast/nn/_glu_down.py says when)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the dispatcher op, as in torchfast/nn/swish.py
            return self.down_proj(torch.ops.torchfast.swiglu(self.gate_proj(x), self.up_proj(x)))
        return glu_down(project(self.gate_proj, x), project(self.up_proj, x), self.down_proj, "swish")


class GeGLU(_GatedMLP):
    """down_proj(gelu(gate_proj(x)) * up_proj(x)); `approximate` as in torch.nn.GELU."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        approximate: str = "none",
    ):
        super().__init__(hidden_size, intermediate_size, bias, device, dtype)
        gelu_act(approximate, "nn.GeGLU")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the dispatcher op, as in torchfast/nn/swish.py
            return self.down_proj(
                torch.ops.torchfast.geglu(self.gate_proj(x), self.up_proj(x), approximate=self.approximate)
            )
        act = "gelu_tanh" if self.approximate == "tanh" else "gelu"
        return glu_down(project(self.gate_proj, x), project(self.up_proj, x), self.down_proj, act)

    def extra_repr(self) -> str:
        return "" if self.approximate == "none" else f"approximate={self.approximate!r}"
