"""Mixed precision done right: a per-device precision policy and a training step around it.

    policy = torchfast.amp.policy("cpu")                   # bf16 autocast, no scaler
    stepper = torchfast.amp.Stepper(model, optimizer, amp="auto", grad_clip=1.0, accumulate=4)
    result = stepper.step(micro_batches, loss_fn)          # forward, backward, unscale, clip, step
    print(result.loss, result.grad_norm, result.skipped, stepper.skipped_steps)

Everything goes through `torch.amp` (`torch.autocast`, `torch.amp.GradScaler`); the
`torch.cuda.amp` spellings are deprecated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

AMP_MODES = ("auto", "bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class Policy:
    """How one device trains in mixed precision.

    `dtype` is the autocast dtype (None: autocast off, everything in the parameters' dtype).
    `use_scaler` says whether gradients need loss scaling: float16's 5-bit exponent underflows small
    gradients to zero, so fp16 needs a GradScaler; bfloat16 has float32's exponent range and does not.
    """

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def mode(self) -> str:
        """ "bf16", "fp16" or "off"."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """`torch.autocast` for this device and dtype; a no-op context when the policy is "off"."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A `torch.amp.GradScaler` for this device, enabled only when the policy needs loss scaling
        (a disabled scaler passes `scale`, `step` and `update` straight through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def policy(device: torch.device | str | None = None, amp: str = "auto") -> Policy:
    """The precision policy for `device` (default: CUDA when available, else CPU).

    amp="auto": CUDA with bf16 support -> bf16 without scaler; older CUDA -> fp16 with a GradScaler;
    CPU -> bf16 autocast. "bf16", "fp16" and "off" force that mode on any device ("fp16" always gets a
    scaler). Raises ValueError for any other mode.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"torchfast.amp.policy: unknown amp mode {amp!r}; expected one of {AMP_MODES}")
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if amp == "auto":
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            amp = "fp16"
        elif dev.type in ("cuda", "cpu"):
            amp = "bf16"
        else:
            amp = "off"  # other backends (mps, xpu, ...): no autocast policy is assumed for them
    dtype = _DTYPES[amp]
    return Policy(device_type=dev.type, dtype=dtype, use_scaler=dtype == torch.float16)


@dataclass
class StepResult:
    """What one optimizer step did.

    loss: mean loss over the micro-batches (the unscaled, un-divided value, as a float).
    grad_norm: total L2 norm of the (unscaled) gradients before clipping; inf/nan when they overflowed.
    skipped: True when the optimizer step was skipped because the gradients were not finite.
    scale: the GradScaler's scale after the step (1.0 without a scaler).
    """

    loss: float
    grad_norm: float
    skipped: bool
    scale: float


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """A batch `(input, ..., target)` -> (inputs, target). Lists and tuples of two or more items only:
    the model gets every item but the last, the loss function gets the output and the last item."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            "torchfast: a batch must be a tuple or list (input, ..., target) with at least two items; "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return tuple(batch[:-1]), batch[-1]


def move_batch(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) tuple/list/dict batch moved to `device` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch


class Stepper:
    """One optimizer step over k micro-batches, with the mixed-precision details in the right order:

    1. for each micro-batch: forward and loss under autocast (and only those: backward runs outside,
       in the dtypes autocast chose for forward), `scaler.scale(loss / k).backward()`; under DDP every
       micro-batch but the last runs inside `model.no_sync()`, so gradients are all-reduced once; under
       FSDP2 (a `fully_shard`ed model) inside `set_requires_gradient_sync(False)`, so they are
       reduce-scattered once;
    2. `scaler.unscale_(optimizer)`, so clipping and the reported norm see the true gradients;
    3. the total gradient norm, and clipping to `grad_clip` when set (with FSDP2's sharded gradients
       the norm is that of the whole gradient, the same on every rank);
    4. `scaler.step(optimizer)` and `scaler.update()`: with fp16 a step whose gradients hold inf/NaN is
       skipped and the scale lowered. Without a scaler, a non-finite norm skips the step as well,
       rather than writing NaN into the weights. Skipped steps are counted in `skipped_steps`;
    5. `optimizer.zero_grad(set_to_none=True)`.

    `model` is what is called (it may be DDP-wrapped, sharded or compiled); `ddp` is the DDP module
    whose `no_sync` is used, or the root FSDP2 module whose gradient sync is switched off (found
    automatically when `model` is itself one). Losses are divided by
    the number of micro-batches, which matches one large batch when the loss is a mean and the
    micro-batches have equal sizes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        amp: str | Policy = "auto",
        device: torch.device | str | None = None,
        grad_clip: float | None = None,
        ddp: nn.Module | None = None,
    ):
        self.model, self.optimizer = model, optimizer
        self.policy = amp if isinstance(amp, Policy) else policy(device, amp)
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
            raise ValueError(
                f"torchfast.amp.Stepper: grad_clip must be a positive number or None, " f"got {grad_clip!r}"
            )
        self.grad_clip = grad_clip
        self.scaler = self.policy.make_scaler()
        from torch.nn.parallel import DistributedDataParallel

        if ddp is None and (isinstance(model, DistributedDataParallel) or _is_fsdp(model)):
            ddp = model
        self.ddp = ddp
        self.steps = 0
        self.skipped_steps = 0

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        if self.ddp is None or last:
            return contextlib.nullcontext()
        if _is_fsdp(self.ddp):
            return _fsdp_no_sync(self.ddp)
        return self.ddp.no_sync()

    def step(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[..., torch.Tensor],
        on_loss: Callable[[torch.Tensor], None] | None = None,
    ) -> StepResult:
        """Run one optimizer step over `micro_batches` (each `(input, ..., target)` on the right device).

        `on_loss(loss)` is called with each micro-batch loss before backward (e.g. to stop on NaN).
        Returns a StepResult."""
        k = len(micro_batches)
        if k < 1:
            raise ValueError("torchfast.amp.Stepper.step: micro_batches is empty; pass at least one batch")
        total = 0.0
        for i, batch in enumerate(micro_batches):
            inputs, target = split_batch(batch)
            with self._no_sync(last=i == k - 1):
                with self.policy.autocast():
                    loss = loss_fn(self.model(*inputs), target)
                if on_loss is not None:
                    on_loss(loss)
                self.scaler.scale(loss / k).backward()
            total += loss.detach().float().item()
        self.scaler.unscale_(self.optimizer)
        params = self._params()
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            if hasattr(norm, "full_tensor"):
                # FSDP2: the norm of this rank's shards is a partial DTensor; full_tensor() all-reduces
                # it, so every rank clips by, and skips on, the same global norm.
                norm = norm.full_tensor()
        else:
            norm = torch.zeros(())
        grad_norm = norm.item()
        if self.grad_clip is not None and params and math.isfinite(grad_norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        skipped = self._optimizer_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.skipped_steps += skipped
        return StepResult(loss=total / k, grad_norm=grad_norm, skipped=skipped, scale=self.scale)

    def _optimizer_step(self, grad_norm: float) -> bool:
        if self.scaler.is_enabled():
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # GradScaler skips the step exactly when it found inf/NaN, and then lowers the scale.
            return self.scaler.get_scale() < before
        if not math.isfinite(grad_norm):
            return True
        self.optimizer.step()
        return False

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 when no scaler is in use)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0


def _is_fsdp(model: nn.Module) -> bool:
    """Whether `model` is an FSDP2 module (fully_shard was applied to it). Without
    torch.distributed.fsdp imported nothing can be one, and the check costs no import."""
    import sys

    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    """FSDP2's counterpart of DDP's no_sync(): gradients accumulate unsharded in each rank and are
    reduce-scattered by the next backward that runs with sync on. Restored even when the step raises."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def autocast(device: torch.device | str | None = None, amp: str = "auto") -> Iterator[Policy]:
    """`with torchfast.amp.autocast("cpu"):` autocast by the device's policy (for inference or
    evaluation); yields the Policy."""
    p = policy(device, amp)
    with p.autocast():
        yield p
