"""Sharded Trainer checkpoints through `torch.distributed.checkpoint` (DCP), for strategy="fsdp".

Layout under the Trainer's checkpoint_dir:

    step-00000006/           one complete checkpoint: DCP's files (every rank writes its own shards of
        __0_0.distcp ...     the model and the optimizer state, rank 0 the metadata) and trainer.pt,
        .metadata            rank 0's torch.save of the rest: step, epoch, position in the epoch, loss
        trainer.pt           history, scheduler and scaler state, every rank's RNG state
    latest                   the name of the newest complete checkpoint ("step-00000006")

A checkpoint is published by rewriting `latest` atomically after DCP has finished on every rank and
trainer.pt is on disk; a crash in the middle of a write leaves `latest` naming the previous one.
Older step folders are removed once a newer one is published. All ranks must see the same folder (a
shared file system across nodes), as DCP's file system writer requires.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

LATEST = "latest"
META = "trainer.pt"


def step_name(step: int) -> str:
    """The folder of the checkpoint written after optimizer step `step` (zero-padded: names sort by step)."""
    return f"step-{step:08d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None when none was published."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / META).is_file():
        raise RuntimeError(
            f"torchfast.Trainer: {pointer} names {path.name}, which holds no {META}; the checkpoint "
            "folder was changed by hand: remove it to start afresh"
        )
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
    *, is_main: bool, barrier: Any, save_meta: Any,
) -> Path:
    """Write one checkpoint (a collective: every rank calls it) and publish it. `meta` is rank 0's
    (other ranks may pass anything); `save_meta(obj, path)` writes it atomically; `barrier()` waits
    for every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    published = latest(root)  # the same on every rank: each save ends with a barrier after publishing
    name = step_name(step)
    if published is not None and published.name == name:
        # A fresh run in an old checkpoint_dir reaching a step that is already published: write
        # beside it, so that the published checkpoint stays whole until `latest` names the new one.
        name += "-again"
    path = root / name
    if is_main:
        if path.exists():  # a write that crashed before it was published
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier()
    # FQN-keyed state: the model's DTensor shards and the optimizer state of those shards, each rank
    # writing its own; plain tensors (AdamW's step counts) are written once.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_is_meant():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
    # dcp.save returns on rank 0 after every rank's write results reached it: the shards are on disk.
    if is_main:
        save_meta(meta, path / META)
        _write_text_atomic(root / LATEST, path.name)
        for old in root.glob("step-*"):
            if old.is_dir() and old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)
    # No rank may read `latest` before rank 0 has rewritten it: a rank that went on would otherwise see
    # the previous checkpoint (its folder removed just above) in fit(resume=True) or checkpoint_path.
    barrier()
    return path


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """Read the checkpoint folder `path` into `model` and `optimizer` (every rank its own shards; a
    collective) and return rank 0's trainer.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = torch.load(path / META, map_location=device, weights_only=True)
    # get_state_dict gives the structure to load into; for a fresh optimizer it first creates its
    # state with a zero-learning-rate step (torch's _init_optim_state), which the load overwrites.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns that it assumes a single process whenever no process group is up; for the Trainer in a
    world of one process that is what is meant, so the warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield
