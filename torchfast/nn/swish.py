"""Drop-in replacement for torch.nn.SiLU backed by the fused swish op."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.ops.swish import swish


class Swish(nn.Module):
    """y = x * sigmoid(x), elementwise; same constructor, state and output as `torch.nn.SiLU`.

    `inplace=True` is accepted so that code and repr written for nn.SiLU keep working, but the result
    is returned in a new tensor: the fused backward recomputes from the saved input, which an in-place
    write would destroy.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot compile the Python dispatch in torchfast.swish (registry walk, impl=
            # and use_impl choice), so a scripted module calls the dispatcher op that dispatch runs by
            # default: the same fused kernel, known to TorchScript through its schema. The scripting
            # compiler only compiles this branch; eager, trace, compile and export take the one below.
            return torch.ops.torchfast.swish(input)
        return swish(input)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


SiLU = Swish
