"""Reference swish (pure PyTorch, differentiable; exact in float64) and its backward formula: what the
native op (torchfast/ops/swish.py) and the Triton operator (torchfast/triton/swish.py) are tested
against, and the kernels of the build without _C.
"""

from __future__ import annotations

import torch


def swish_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch swish, differentiable by autograd; exact for float64 inputs."""
    return x * torch.sigmoid(x)


def swish_backward_reference(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL/dx = grad_out * s * (1 + x * (1 - s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return grad_out * s * (1 + x * (1 - s))
