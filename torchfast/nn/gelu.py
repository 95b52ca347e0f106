"""Drop-in replacement for torch.nn.GELU backed by the fused bias_act op (without a bias)."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.ops._activations import gelu_act
from torchfast.ops.bias_act import bias_act


class GELU(nn.Module):
    """gelu(x) = x * Phi(x) (approximate="none", exact erf) or its tanh approximation
    (approximate="tanh"); same constructor, repr, state and output layout as `torch.nn.GELU`.
    Backward saves only the input."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self._act = gelu_act(approximate, "nn.GELU")
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the dispatcher op, as in torchfast/nn/swish.py
            return torch.ops.torchfast.bias_act(input, None, act=self._act)
        return bias_act(input, None, act=self._act)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
