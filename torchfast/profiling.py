"""Profiling and NaN hunting.

    with torchfast.profiling.profile("runs/profile") as prof:
        for batch in loader:
            train_step(batch)
            prof.step()                  # advances the schedule: wait, warmup, then `active` recorded steps
    # prints the top ops; runs/profile/*.pt.trace.json opens in TensorBoard, Perfetto or chrome://tracing

torchfast's operators are dispatcher ops, so they appear in the trace under their own names
(`torchfast::swish`, `torchfast::rms_norm_backward`, ...), next to ATen's.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from torch.profiler import ProfilerActivity, schedule, tensorboard_trace_handler


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"torchfast.profiling.profile: {name} must be an int >= {minimum}, got {value!r}")


@contextlib.contextmanager
def profile(
    log_dir: str | Path,
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    record_shapes: bool = True,
    profile_memory: bool = True,
    with_stack: bool = False,
    cuda: bool | None = None,
    top: int = 15,
    sort_by: str | None = None,
    file: TextIO | None = sys.stdout,
) -> Iterator[torch.profiler.profile]:
    """`torch.profiler.profile` with a schedule (skip `wait` steps, warm up `warmup`, record `active`,
    once) and a `tensorboard_trace_handler(log_dir)` that writes one `*.pt.trace.json` per recorded
    window. Call `prof.step()` after each step. On exit prints the `top` ops by self time to `file`
    (None: print nothing). CUDA activity is recorded when `cuda` is True, or by default when a GPU is
    available. The trace file is JSON in the Chrome trace format; `trace_files(log_dir)` lists them.
    """
    for name, value, minimum in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        _check_count(name, value, minimum)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    prof = torch.profiler.profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(log_dir)),
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )
    with prof:
        yield prof
    if file is not None:
        if prof.step_num < wait + warmup + active:
            print(
                f"torchfast.profiling: {prof.step_num} steps profiled; the schedule needs "
                f"wait+warmup+active = {wait + warmup + active} prof.step() calls before a trace is "
                "written",
                file=file,
            )
        else:
            key = sort_by or ("self_cuda_time_total" if use_cuda else "self_cpu_time_total")
            print(prof.key_averages().table(sort_by=key, row_limit=top), file=file)


def trace_files(log_dir: str | Path) -> list[Path]:
    """The trace files that profile() wrote under `log_dir`, oldest first."""
    return sorted(Path(log_dir).glob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)


@contextlib.contextmanager
def detect_anomaly(model: nn.Module | None = None, *, check_nan: bool = True) -> Iterator[None]:
    """Hunt the origin of a NaN/Inf gradient: `torch.autograd.detect_anomaly`, which makes the backward
    op that produced NaN raise with the traceback of the forward call that created it; with a `model`
    also torchfast.hooks.NonFiniteDetector, which names the first module whose output or input
    gradient is not finite. Slow (it checks every backward op): for debugging, not for training runs.
    """
    from torchfast.hooks import NonFiniteDetector

    detector = NonFiniteDetector(model) if model is not None else contextlib.nullcontext()
    with torch.autograd.detect_anomaly(check_nan=check_nan), detector:
        yield
