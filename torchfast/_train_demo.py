"""The training stage of `torchfast demo`, on torchfast.Trainer (kept out of demo.py so that the other
demo stages can change independently).

Under `torchrun --nproc_per_node=N` every process trains on its shard of each global batch (DDP over
Gloo on CPU, NCCL on GPUs); rank 0 alone writes TensorBoard logs, the profiler trace and the
activation summary, and the caller lets rank 0 alone print, export and time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from torchfast import distributed as tfdist
from torchfast.hooks import ActivationStats
from torchfast.profiling import trace_files
from torchfast.trainer import Trainer

LOG_SUBDIR = "tensorboard"


@dataclass
class TrainRun:
    """What the demo's training stage produced. `losses`: per optimizer step, averaged over ranks.
    `log_dir`/`trace`: TensorBoard folder and profiler trace file (None without tensorboard).
    `activations`: ActivationStats table of the trained model on one batch (rank 0; "" elsewhere)."""

    losses: list[float]
    seconds: float
    world_size: int
    per_rank_batch: int
    log_dir: str | None
    trace: str | None
    activations: str
    note: str | None = None


def _fp32_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The loss in fp32: a bf16 mean of squared errors would round away the small late losses.
    return F.mse_loss(pred.float(), target.float())


def train_with_trainer(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    global_batch: int,
    lr: float,
    amp: str,
    out: Path,
    progress: TextIO | None = None,
) -> TrainRun:
    """One epoch of AdamW on MSE over the samples (x, y) in global batches of `global_batch`, split
    evenly over the torchrun processes (without torchrun: one process, the whole batch), under the AMP
    policy `amp`, logging to <out>/tensorboard with a profiler trace of steps 2-4 when tensorboard is
    installed. The caller initialises torchfast.distributed and seeds the model identically on every
    rank (DDP also broadcasts rank 0's weights)."""
    world = tfdist.world()
    per_rank = max(1, global_batch // world.world_size)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    log_dir = out / LOG_SUBDIR if has_tb else None
    note = None if has_tb else "no TensorBoard logs or profiler trace: pip install 'torchfast[train]'"
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    trainer = Trainer(model, opt, _fp32_mse, amp=amp, log_dir=log_dir, profile=has_tb, progress=progress)
    loader = tfdist.data_loader(TensorDataset(x, y), per_rank, shuffle=False, num_workers=0)
    result = trainer.fit(loader, epochs=1)
    table, trace = "", None
    if world.is_main:
        model.eval()
        with ActivationStats(model) as acts, torch.no_grad(), trainer.policy.autocast():
            model(x[:global_batch].to(world.device))
        table = acts.summary(file=None)
        if trainer._writer is not None:
            acts.log(trainer._writer, result.steps)
        trainer.close()
        files = trace_files(result.profile_dir) if result.profile_dir else []
        trace = str(files[-1]) if files else None
    return TrainRun(
        losses=result.losses,
        seconds=result.seconds,
        world_size=world.world_size,
        per_rank_batch=per_rank,
        log_dir=str(log_dir) if log_dir else None,
        trace=trace,
        activations=table,
        note=note,
    )
