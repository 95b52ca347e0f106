"""`torchfast.Trainer`: mixed precision, DDP, accumulation, clipping, TensorBoard, checkpoints, resume.

    trainer = torchfast.Trainer(model, optimizer, torch.nn.functional.mse_loss, amp="auto", grad_clip=1.0,
                                accumulate=2, log_dir="runs/exp1", checkpoint_dir="ckpt")
    result = trainer.fit(dataset_or_loader, epochs=3, batch_size=64, resume=True)

The pieces are torchfast.amp.Stepper (one optimizer step), torchfast.distributed (torchrun, DDP or
FSDP2, sharded loading), torchfast._dcp (sharded checkpoints for strategy="fsdp"),
torchfast.hooks.NonFiniteDetector and torchfast.profiling.profile; the Trainer only
orders them. Batches are tuples `(input, ..., target)`: the model gets the inputs, `loss_fn` gets the
model's output and the target.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from torchfast import _dcp
from torchfast import distributed as tfdist
from torchfast._progress import Progress
from torchfast.amp import AMP_MODES, Stepper, _is_fsdp, move_batch, policy

CHECKPOINT_NAME = "checkpoint.pt"
STRATEGIES = ("ddp", "fsdp")
FSDP_OPTIONS = ("reshard_after_forward", "mp_policy", "offload", "mesh")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; training stopped instead of writing NaN into the weights."""


def summary_writer(log_dir: str | Path, who: str = "torchfast") -> Any:
    """A torch.utils.tensorboard.SummaryWriter for `log_dir`. Raises ImportError naming the missing
    `tensorboard` package (the `train` extra) when it is not installed."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so less clearly)
    except ImportError as e:
        raise ImportError(
            f"{who}: logging to TensorBoard (log_dir=...) needs the 'tensorboard' package, "
            "which is not installed: pip install 'torchfast[train]' (or tensorboard>=2.14)"
        ) from e
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


@dataclass
class FitResult:
    """What fit() did. `losses`: the loss of every optimizer step since the run began (a resumed run
    includes the steps before the interruption), averaged over ranks. `val_losses`: one per epoch with
    val_data. `samples_per_s`: global samples per second over the steps this call ran."""

    steps: int
    epochs: int
    losses: list[float]
    val_losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    resumed_from: str | None = None
    log_dir: str | None = None
    profile_dir: str | None = None
    checkpoint: str | None = None


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The numpy state as a tensor, so torch.load(weights_only=True) can read it back.
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash
    mid-write leaves the previous file intact (a rename within one file system is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class Trainer:
    """Train `model` with `optimizer` on `loss_fn(model(*inputs), target)`.

    amp: "auto" (per torchfast.amp.policy), "bf16", "fp16" (with a GradScaler) or "off".
    grad_clip: clip the total gradient norm (after unscaling) to this value; None: no clipping.
    accumulate: micro-batches per optimizer step (each loader batch is one micro-batch; the last
        step of an epoch takes what is left). Under DDP gradients are all-reduced once per step.
    compile: torch.compile the (DDP-wrapped) model; a dict is passed to torch.compile as keyword
        arguments (e.g. {"mode": "max-autotune"}). Checkpoints hold the plain module's state_dict.
        With strategy="fsdp" under torchrun each sharded block is compiled in place instead
        (module.compile), and the root's own forward, with FSDP2's hooks around the blocks, runs eager.
    log_dir: TensorBoard scalars there (rank 0): train/loss, train/lr, train/grad_norm,
        train/samples_per_s, amp/scale, train/skipped_steps, val/loss. Needs the `tensorboard` package.
    profile: profile optimizer steps 3-5 of the run (after one skipped and one warm-up step) with
        torchfast.profiling.profile, trace under <log_dir>/profile (rank 0).
    checkpoint_dir: write <checkpoint_dir>/checkpoint.pt (rank 0, atomically) at each epoch end and
        every `checkpoint_every` optimizer steps: model, optimizer, scaler, scheduler, epoch, position
        in the epoch, loss history and every rank's RNG state. fit(resume=True) continues from it.
    scheduler: an LR scheduler stepped after every optimizer step (saved in checkpoints).
    detect_nonfinite: watch every module with torchfast.hooks.NonFiniteDetector; a NaN/Inf output
        stops training naming the module and step. Without it a NaN loss still stops training
        (NonFiniteLossError), without the module's name.
    progress: stream for the progress bar and epoch lines (rank 0; None: silent).
    device: "cpu"/"cuda" (default: CUDA when available). world_size: when given, torchrun must have
        started exactly that many processes.
    strategy: "ddp" (default): every process holds the whole model, wrapped in
        DistributedDataParallel under torchrun; checkpoint.pt as above. "fsdp": the model is sharded
        with FSDP2 (torchfast.distributed.shard: `blocks` each their own group, then the root) and the
        optimizer re-pointed at the shards (it must not have stepped yet); a model the caller sharded
        already (fully_shard) is taken as it is, with an optimizer built on its shards. Checkpoints are
        then sharded, through torch.distributed.checkpoint: <checkpoint_dir>/step-<N>/ (each rank its
        own shards of the model and optimizer state, rank 0 the rest in trainer.pt) and
        <checkpoint_dir>/latest naming the newest complete one; resume is exact as with "ddp".
        In a world of one process "fsdp" trains the plain model and still writes sharded checkpoints.
    blocks: strategy="fsdp" only: which submodules are FSDP2 groups; None (the children of every
        nn.ModuleList), a module class or tuple of classes, or a function (name, module) -> bool.
    fsdp_options: strategy="fsdp" only: keyword arguments of torchfast.distributed.shard
        (reshard_after_forward, mp_policy, offload, mesh).

    Raises ValueError/TypeError for a model without trainable parameters, an optimizer holding
    parameters that are not the model's, accumulate < 1, an unknown amp mode, profile without log_dir;
    and, before any collective, for DDP and FSDP mixed (a DistributedDataParallel inside the model with
    strategy="fsdp", a fully_shard'ed module with strategy="ddp"), `blocks`/`fsdp_options` without
    strategy="fsdp", amp="fp16" (a GradScaler) with strategy="fsdp", and an optimizer that
    already holds state when the Trainer shards the model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        *,
        amp: str = "auto",
        grad_clip: float | None = None,
        accumulate: int = 1,
        compile: bool | dict = False,
        log_dir: str | Path | None = None,
        profile: bool = False,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        scheduler: Any = None,
        detect_nonfinite: bool = False,
        progress: TextIO | None = sys.stderr,
        device: str | torch.device | None = None,
        world_size: int | None = None,
        strategy: str = "ddp",
        blocks: Any = None,
        fsdp_options: dict | None = None,
    ):
        self._check_args(model, optimizer, loss_fn, amp, accumulate, profile, log_dir, checkpoint_every)
        presharded = _check_strategy(model, optimizer, strategy, blocks, fsdp_options)
        self.strategy = strategy
        self.world = tfdist.init(device=device, expected_world_size=world_size)
        self.device = self.world.device
        self.policy = policy(self.device, amp)
        if strategy == "fsdp" and self.policy.use_scaler:
            # GradScaler looks for inf/NaN in this rank's gradient shards only: ranks could disagree on
            # skipping a step and their shards of one model would drift apart.
            raise ValueError(
                f"torchfast.Trainer: amp={amp!r} means float16 with a GradScaler here, which is not "
                "supported with strategy='fsdp' (the scaler checks only this rank's gradient shards); "
                "use amp='bf16', or fsdp_options={'mp_policy': MixedPrecisionPolicy(...)} with amp='off'"
            )
        self.module = model.to(self.device)
        ddp = None
        if strategy == "fsdp":
            self.model = self.module if presharded else _shard(self.module, optimizer, blocks, fsdp_options)
        else:
            self.model = tfdist.wrap(self.module)
            ddp = self.model if self.model is not self.module else None
        if compile:
            options = compile if isinstance(compile, dict) else {}
            blocks_sharded = [m for m in self.module.modules() if m is not self.module and _is_fsdp(m)]
            if blocks_sharded:
                # Per block, as FSDP2 is tested with (tests/train/test_fsdp.py: one graph per block, no
                # graph break); in place, so parameter names and checkpoints stay those of the model.
                for block in blocks_sharded:
                    block.compile(**options)
            else:
                self.model = torch.compile(self.model, **options)
        self.optimizer, self.loss_fn, self.scheduler = optimizer, loss_fn, scheduler
        self.stepper = Stepper(self.model, optimizer, amp=self.policy, grad_clip=grad_clip, ddp=ddp)
        self.accumulate = accumulate
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.profile = profile
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.detect_nonfinite = detect_nonfinite
        self.progress = progress if self.world.is_main else None
        self.step = 0
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self._writer = None

    @staticmethod
    def _check_args(model, optimizer, loss_fn, amp, accumulate, profile, log_dir, checkpoint_every) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"torchfast.Trainer: model must be an nn.Module, got {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "torchfast.Trainer: the model has no trainable parameters (none with "
                "requires_grad=True); there is nothing to train"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "torchfast.Trainer: optimizer must be a torch.optim.Optimizer built on "
                f"model.parameters(), got {type(optimizer).__name__}"
            )
        own = {id(p) for p in model.parameters()}
        foreign = sum(id(p) not in own for g in optimizer.param_groups for p in g["params"])
        if foreign:
            raise ValueError(
                f"torchfast.Trainer: the optimizer holds {foreign} parameters that are not the "
                "model's; build it on model.parameters()"
            )
        if not callable(loss_fn):
            raise TypeError(f"torchfast.Trainer: loss_fn must be callable(output, target), got {loss_fn!r}")
        if amp not in AMP_MODES:
            raise ValueError(f"torchfast.Trainer: unknown amp mode {amp!r}; expected one of {AMP_MODES}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(
                f"torchfast.Trainer: accumulate must be an int >= 1 (micro-batches per "
                f"optimizer step), got {accumulate!r}"
            )
        if profile and log_dir is None:
            raise ValueError("torchfast.Trainer: profile=True writes its trace under log_dir; give a log_dir")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(
                f"torchfast.Trainer: checkpoint_every must be an int >= 1 or None, "
                f"got {checkpoint_every!r}"
            )

    # -------------------------------------------------------------------------------------------
    # data

    def _loader(self, data: Any, batch_size: int | None, shuffle: bool, what: str) -> DataLoader:
        if isinstance(data, DataLoader):
            if self.world.distributed and not isinstance(data.sampler, DistributedSampler):
                raise ValueError(
                    f"torchfast.Trainer.fit: {what} is a DataLoader without a DistributedSampler, "
                    "so every rank would train on the same batches; build it with "
                    "torchfast.distributed.data_loader(dataset, batch_size)"
                )
            loader = data
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            if len(data) == 0:
                raise ValueError(f"torchfast.Trainer.fit: {what} is empty (0 samples)")
            if batch_size is None:
                raise ValueError(
                    f"torchfast.Trainer.fit: {what} is a Dataset; give batch_size= (per process) "
                    "or pass a DataLoader"
                )
            loader = tfdist.data_loader(data, batch_size, shuffle=shuffle)
        else:
            raise TypeError(
                f"torchfast.Trainer.fit: {what} must be a map-style Dataset or a DataLoader, "
                f"got {type(data).__name__}"
            )
        if len(loader) == 0:
            raise ValueError(f"torchfast.Trainer.fit: {what} is empty (0 batches)")
        return loader

    # -------------------------------------------------------------------------------------------
    # checkpoints

    @property
    def checkpoint_path(self) -> Path | None:
        """strategy="ddp": <checkpoint_dir>/checkpoint.pt. strategy="fsdp": the folder of the newest
        complete sharded checkpoint (None before the first one)."""
        if self.checkpoint_dir is None:
            return None
        if self.strategy == "fsdp":
            return _dcp.latest(self.checkpoint_dir)
        return self.checkpoint_dir / CHECKPOINT_NAME

    def save_checkpoint(self, epoch: int, batch: int) -> Path | None:
        """Write the checkpoint: every rank contributes its RNG state, rank 0 writes (with
        strategy="fsdp" every rank writes its shards as well: call it on every rank). `epoch` and
        `batch` are where training continues (batch: loader batches already done in that epoch)."""
        if self.checkpoint_dir is None:
            return None
        rngs: list[Any] = [_rng_state()]
        if self.world.distributed:
            rngs = [None] * self.world.world_size
            dist.all_gather_object(rngs, _rng_state())
        if self.strategy == "fsdp":
            return _dcp.save(self.checkpoint_dir, self.step, self.module, self.optimizer,
                             self._meta(epoch, batch, rngs), is_main=self.world.is_main,
                             barrier=tfdist.barrier, save_meta=save_atomic)
        if self.world.is_main:
            state = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self._meta(epoch, batch, rngs),
            }
            save_atomic(state, self.checkpoint_path)
        return self.checkpoint_path

    def _meta(self, epoch: int, batch: int, rngs: list[Any]) -> dict[str, Any]:
        """Everything of a checkpoint but the model and the optimizer state."""
        return {
            "strategy": self.strategy,
            "scaler": self.stepper.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "losses": self.losses,
            "val_losses": self.val_losses,
            "skipped_steps": self.stepper.skipped_steps,
            "world_size": self.world.world_size,
            "accumulate": self.accumulate,
            "rng": rngs,
        }

    def _resume_point(self) -> Path | None:
        """The checkpoint fit(resume=True) continues from, or None. Raises when checkpoint_dir holds
        only a checkpoint of the other strategy (resuming afresh would silently drop it)."""
        mine = self.checkpoint_path
        if mine is not None and mine.exists():
            return mine
        other = "ddp" if self.strategy == "fsdp" else "fsdp"
        found = ((self.checkpoint_dir / CHECKPOINT_NAME).is_file() if other == "ddp"
                 else (self.checkpoint_dir / _dcp.LATEST).is_file())
        if found:
            raise ValueError(
                f"torchfast.Trainer.fit(resume=True): {self.checkpoint_dir} holds a checkpoint written "
                f"with strategy={other!r} but this Trainer has strategy={self.strategy!r}; resume with "
                f"strategy={other!r}, or use another checkpoint_dir to start afresh"
            )
        return None

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        if self.strategy == "fsdp":
            state = _dcp.load(path, self.module, self.optimizer, self.device)
        else:
            state = torch.load(path, map_location=self.device, weights_only=True)
        if state["world_size"] != self.world.world_size:
            raise RuntimeError(
                f"torchfast.Trainer.fit(resume=True): {path} was written by "
                f"{state['world_size']} processes but this run has world size "
                f"{self.world.world_size}; resume with the same torchrun --nproc_per_node "
                "(the data order and RNG streams depend on it)"
            )
        if state["accumulate"] != self.accumulate:
            raise ValueError(
                f"torchfast.Trainer.fit(resume=True): {path} was trained with accumulate="
                f"{state['accumulate']}, this Trainer has accumulate={self.accumulate}"
            )
        if self.strategy != "fsdp":
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.stepper.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses, self.val_losses = state["step"], state["losses"], state["val_losses"]
        self.stepper.skipped_steps = state["skipped_steps"]
        self.stepper.steps = state["step"]
        return state

    # -------------------------------------------------------------------------------------------
    # the loop

    def _writer_for_run(self):
        if self.log_dir is None or not self.world.is_main:
            return None
        if self._writer is None:
            self._writer = summary_writer(self.log_dir, "torchfast.Trainer")
        return self._writer

    def _check_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"torchfast.Trainer: the loss is {loss.detach().float().item()} at step {self.step + 1}; "
                "training stopped. Trainer(detect_nonfinite=True) names the first module that produced "
                "NaN/Inf"
            )

    def fit(
        self,
        train_data: Any,
        epochs: int,
        val_data: Any = None,
        *,
        batch_size: int | None = None,
        resume: bool = False,
    ) -> FitResult:
        """Train for `epochs` epochs over `train_data` (a DataLoader, or a Dataset with `batch_size` per
        process), evaluating `val_data` after each epoch. resume=True continues from the checkpoint in
        checkpoint_dir when there is one (the same final weights as an uninterrupted run), else starts
        afresh. Returns a FitResult."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"torchfast.Trainer.fit: epochs must be an int >= 1, got {epochs!r}")
        if resume and self.checkpoint_dir is None:
            raise ValueError("torchfast.Trainer.fit: resume=True needs Trainer(checkpoint_dir=...)")
        loader = self._loader(train_data, batch_size, True, "train_data")
        val_loader = self._loader(val_data, batch_size, False, "val_data") if val_data is not None else None
        n = len(loader)
        steps_per_epoch = math.ceil(n / self.accumulate)
        start_epoch, skip, resumed_from = 0, 0, None
        path = self._resume_point() if resume else None
        if path is not None:
            state = self._load_checkpoint(path)
            start_epoch, skip, resumed_from = state["epoch"], state["batch"], str(path)
            rng = state["rng"][self.world.rank]
        writer = self._writer_for_run()
        remaining = max(0, epochs - start_epoch) * steps_per_epoch - math.ceil(skip / self.accumulate)
        bar = Progress(self.step + remaining, self.progress, initial=self.step)
        detector = contextlib.nullcontext()
        if self.detect_nonfinite:
            from torchfast.hooks import NonFiniteDetector

            detector = NonFiniteDetector(self.module, check_backward=not self.stepper.scaler.is_enabled())
        profiler_cm = contextlib.nullcontext()
        profile_dir = None
        if self.profile and self.world.is_main:
            from torchfast.profiling import profile

            profile_dir = self.log_dir / "profile"
            profiler_cm = profile(profile_dir, wait=1, warmup=1, active=3, file=None)
        samples, t0 = 0, time.perf_counter()
        self.model.train()
        try:
            with detector, profiler_cm as prof:
                for epoch in range(start_epoch, epochs):
                    if isinstance(loader.sampler, DistributedSampler):
                        loader.sampler.set_epoch(epoch)
                    if resumed_from is not None and epoch == start_epoch and skip == 0:
                        _set_rng_state(rng)  # saved before this epoch's iterator drew its seed
                    it = iter(loader)
                    done = 0
                    if resumed_from is not None and epoch == start_epoch and skip:
                        for _ in islice(it, skip):
                            pass
                        done = skip
                        _set_rng_state(rng)  # saved after the iterator was made and `skip` batches read
                    while done < n:
                        size = min(self.accumulate, n - done)
                        group = [move_batch(b, self.device) for b in islice(it, size)]
                        done += size
                        samples += self._train_step(group, writer, detector, t0, samples)
                        rate = samples / max(time.perf_counter() - t0, 1e-9)
                        bar.update(self.step, loss=f"{self.losses[-1]:.4f}", samples_s=f"{rate:,.0f}")
                        if prof is not None:
                            prof.step()
                        if self.checkpoint_every and self.step % self.checkpoint_every == 0 and done < n:
                            self.save_checkpoint(epoch, done)
                    if val_loader is not None:
                        self.val_losses.append(self.evaluate(val_loader))
                        if writer is not None:
                            writer.add_scalar("val/loss", self.val_losses[-1], self.step)
                        self.model.train()
                    self.save_checkpoint(epoch + 1, 0)
        finally:
            bar.close()
            if writer is not None:
                writer.flush()
        seconds = time.perf_counter() - t0
        return FitResult(
            steps=self.step,
            epochs=epochs,
            losses=list(self.losses),
            val_losses=list(self.val_losses),
            skipped_steps=self.stepper.skipped_steps,
            seconds=seconds,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            resumed_from=resumed_from,
            log_dir=str(self.log_dir) if self.log_dir else None,
            profile_dir=str(profile_dir) if profile_dir else None,
            checkpoint=str(self.checkpoint_path) if self.checkpoint_path is not None else None,
        )

    def _train_step(self, group: list[Any], writer: Any, detector: Any, t0: float, samples: int) -> int:
        if hasattr(detector, "step"):
            detector.step = self.step + 1
        result = self.stepper.step(group, self.loss_fn, on_loss=self._check_loss)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        loss = result.loss
        if self.world.distributed:
            loss = tfdist.all_reduce_mean(loss).item()
        self.losses.append(loss)
        n = sum(_batch_len(b) for b in group) * self.world.world_size
        if writer is not None:
            elapsed = time.perf_counter() - t0
            writer.add_scalar("train/loss", loss, self.step)
            writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
            writer.add_scalar("train/grad_norm", result.grad_norm, self.step)
            writer.add_scalar(
                "train/samples_per_s", (samples + n) / elapsed if elapsed > 0 else 0.0, self.step
            )
            writer.add_scalar("amp/scale", result.scale, self.step)
            writer.add_scalar("train/skipped_steps", self.stepper.skipped_steps, self.step)
        return n

    @torch.no_grad()
    def evaluate(self, data: Any, *, batch_size: int | None = None) -> float:
        """Mean loss over `data` (weighted by batch size, averaged over all ranks), in eval mode under
        the AMP policy's autocast."""
        from torchfast.amp import split_batch

        loader = self._loader(data, batch_size, False, "val_data")
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in loader:
            inputs, target = split_batch(move_batch(batch, self.device))
            with self.policy.autocast():
                loss = self.loss_fn(self.model(*inputs), target)
            k = _batch_len(batch)
            total += torch.stack(
                [loss.detach().double() * k, torch.tensor(k, dtype=torch.float64, device=self.device)]
            )
        if self.world.distributed:
            total = tfdist.all_reduce_mean(total)
        return (total[0] / total[1]).item()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _check_strategy(
    model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Any, blocks: Any, fsdp_options: Any
) -> bool:
    """The strategy arguments, checked before torchfast.distributed.init and any collective (every rank
    raises the same error on its own). Returns whether the model is sharded already (fully_shard)."""
    from torch.nn.parallel import DistributedDataParallel

    if strategy not in STRATEGIES:
        raise ValueError(f"torchfast.Trainer: strategy must be one of {STRATEGIES}, got {strategy!r}")
    sharded = tfdist._first_sharded(model)
    if strategy == "ddp":
        if blocks is not None or fsdp_options is not None:
            given = "blocks" if blocks is not None else "fsdp_options"
            raise ValueError(f"torchfast.Trainer: {given}= applies to strategy='fsdp' only; this Trainer "
                             "has strategy='ddp'")
        if sharded is not None:
            raise ValueError(
                f"torchfast.Trainer: module {sharded!r} of the model is sharded with FSDP2 (fully_shard), "
                "but strategy='ddp' would wrap the model in DistributedDataParallel; DDP and FSDP cannot "
                "be mixed (both reduce the gradients): pass strategy='fsdp'"
            )
        return False
    ddp = tfdist._first(model, DistributedDataParallel)
    if ddp is not None:
        raise ValueError(
            f"torchfast.Trainer: module {ddp!r} of the model is a DistributedDataParallel, but "
            "strategy='fsdp' shards the model with FSDP2; DDP and FSDP cannot be mixed (both reduce the "
            "gradients): pass the plain module (torchfast.distributed.unwrap gives it)"
        )
    if fsdp_options is not None:
        if not isinstance(fsdp_options, dict):
            raise TypeError(f"torchfast.Trainer: fsdp_options must be a dict of keyword arguments of "
                            f"torchfast.distributed.shard, got {type(fsdp_options).__name__}")
        unknown = sorted(set(fsdp_options) - set(FSDP_OPTIONS))
        if unknown:
            raise ValueError(f"torchfast.Trainer: unknown fsdp_options {unknown}; allowed: {FSDP_OPTIONS}")
    if sharded is not None:
        if blocks is not None or fsdp_options is not None:
            raise ValueError(
                f"torchfast.Trainer: module {sharded!r} of the model is sharded already (fully_shard), so "
                "blocks= and fsdp_options= cannot apply: pass the plain model, or leave them out"
            )
        return True
    return False


def _shard(
    model: nn.Module, optimizer: torch.optim.Optimizer, blocks: Any, options: dict | None
) -> nn.Module:
    """`model` sharded with torchfast.distributed.shard, and `optimizer`'s parameter groups re-pointed
    at the sharded parameters. fully_shard replaces every parameter by a new DTensor Parameter of the
    same name, so the optimizer built on the plain model would step tensors the model no longer uses;
    its groups (learning rates, weight decay, ...) are kept, matched by parameter name."""
    if optimizer.state and tfdist.world().distributed:
        # In a world of one nothing is sharded and the optimizer keeps its parameters and state.
        raise ValueError(
            "torchfast.Trainer: with strategy='fsdp' the Trainer shards the model and re-points the "
            "optimizer at the shards, but this optimizer already holds state (it has stepped or loaded a "
            "state_dict); give a fresh one (resume=True restores its state from the checkpoint)"
        )
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    model = tfdist.shard(model, blocks=blocks, **(options or {}))
    sharded = dict(model.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first) if hasattr(first, "__len__") else 1
