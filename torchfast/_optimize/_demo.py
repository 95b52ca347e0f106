"""The demo's model: written in plain PyTorch (no torchfast), then handed to torchfast.optimize, which
fuses each nn.Linear + nn.SiLU pair into torchfast.nn.Linear(activation="swish")."""

from __future__ import annotations

import torch
from torch import nn

from torchfast._optimize import OptimizeReport, optimize


def plain_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear -> SiLU -> Linear, as anyone writes it."""
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, d_out),
    )


def optimized_plain_mlp(d_in: int, hidden: int, d_out: int) -> tuple[nn.Module, OptimizeReport]:
    """plain_mlp (its weights from the global RNG, as before) optimized and verified on a fixed batch."""
    model = plain_mlp(d_in, hidden, d_out)
    example = torch.randn(8, d_in, generator=torch.Generator().manual_seed(0))
    return optimize(model, example_inputs=example)
