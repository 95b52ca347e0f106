"""A gated MLP whose projections keep the original module's child names (w1/w3/w2, wi_0/wi_1/wo, ...),
for MLPs that do not use the gate_proj/up_proj/down_proj names of torchfast.nn.SwiGLU / GeGLU: the
state_dict keys stay the original's."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.nn._glu_down import glu_down, project


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) through the fused swiglu / geglu op, with the three nn.Linear
    projections registered under `names` = (gate, up, down) child names. `act` is "swish", "gelu" or
    "gelu_tanh"."""

    def __init__(
        self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, names: tuple[str, str, str], act: str
    ):
        super().__init__()
        if act not in ("swish", "gelu", "gelu_tanh"):
            raise ValueError(
                f"torchfast optimize GatedMLP: argument 'act' must be swish, gelu or gelu_tanh, got {act!r}"
            )
        self.names = tuple(names)
        self.act = act
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = project(getattr(self, self.names[0]), x)
        up = project(getattr(self, self.names[1]), x)
        return glu_down(gate, up, getattr(self, self.names[2]), self.act)

    def extra_repr(self) -> str:
        return f"act={self.act!r}"
