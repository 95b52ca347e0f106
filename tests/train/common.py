"""The small model and data shared by the Trainer tests and the torchrun worker script."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import torchfast

N_SAMPLES, D_IN, D_OUT = 64, 8, 4
EPOCHS = 2
# name -> (batch size per process with 2 processes, micro-batches per optimizer step). Both make
# global optimizer steps of 16 samples.
CONFIGS = {"plain": (8, 1), "accumulate": (4, 2)}


class Crash(Exception):
    """Stands for the process being killed in the middle of a step."""


def crashing_mse(after_calls: int | None):
    """mse_loss that raises Crash on call number `after_calls` + 1 (a kill in the middle of a step)."""
    calls = [0]

    def loss(out, target):
        calls[0] += 1
        if after_calls is not None and calls[0] > after_calls:
            raise Crash(f"injected crash at loss call {calls[0]}")
        return nn.functional.mse_loss(out.float(), target)

    return loss


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """torchfast modules: fused Linear+swish, RMSNorm, and a plain Linear head."""
    torch.manual_seed(seed)
    layers = [torchfast.nn.Linear(D_IN, 32, activation="swish"), torchfast.nn.RMSNorm(32)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(32, D_OUT))
    return nn.Sequential(*layers)


def dataset(seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D_IN, generator=g)
    return TensorDataset(x, torch.tanh(x[:, :D_OUT] * 2) + 0.1 * torch.randn(N_SAMPLES, D_OUT, generator=g))


def train(
    data: TensorDataset, batch_size: int, accumulate: int, on_trainer=None, **trainer_kwargs
) -> nn.Module:
    """EPOCHS epochs of AdamW in float32 (amp off: the comparison is at fp32 tolerance) over a
    shuffled, sharded loader; returns the trained (unwrapped) model. `on_trainer(trainer)` is called
    before fit (to add a DDP communication hook)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = torchfast.Trainer(
        model,
        opt,
        nn.functional.mse_loss,
        amp="off",
        accumulate=accumulate,
        grad_clip=1.0,
        progress=None,
        **trainer_kwargs,
    )
    loader = torchfast.distributed.data_loader(data, batch_size, shuffle=True, num_workers=0, seed=3)
    if on_trainer is not None:
        on_trainer(trainer)
    trainer.fit(loader, EPOCHS)
    return model
