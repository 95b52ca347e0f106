"""Gated MLPs of LLM blocks: down_proj(act(gate_proj(x)) * up_proj(x)), with the fused swiglu / geglu
op between the projections. Submodule names follow the common LLM MLP (Llama, Mistral, Qwen, Gemma),
so their checkpoints load unchanged."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.ops._activations import gelu_act
from torchfast.ops.glu import geglu, swiglu


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
    fused op whose backward saves only the two projections' outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the dispatcher op, as in torchfast/nn/swish.py
            return self.down_proj(torch.ops.torchfast.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


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
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), approximate=self.approximate))

    def extra_repr(self) -> str:
        return "" if self.approximate == "none" else f"approximate={self.approximate!r}"
