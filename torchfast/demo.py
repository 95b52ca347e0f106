"""`torchfast demo`: the main job, end to end on one small model.

1. A small MLP written in plain PyTorch (nn.Linear, nn.SiLU) is passed through `torchfast.optimize`,
   which fuses each Linear + SiLU into `torchfast.nn.Linear(activation="swish")` and prints its report.
   The model then learns a fixed random teacher network from synthetic batches (fixed seed) with
   `torchfast.Trainer`, under autocast: bfloat16 on CPU, and on a GPU its bfloat16 (float16 with loss
   scaling where bf16 is missing). TensorBoard logs, a profiler trace of three steps and an activation
   summary of the trained model come with it (torchfast/_train_demo.py). Under
   `torchrun --standalone --nproc_per_node=N -m torchfast demo` the N processes share each batch
   (DDP); rank 0 alone prints, exports and times.
2. The loss must fall to below `LOSS_DROP` times its starting value, else the demo fails (exit 1).
3. The trained model is exported to ONNX with `torchfast.export.onnx(..., verify=True)`, which runs
   the file in onnxruntime and returns the largest difference from eager PyTorch.
4. A mini speed table: swish forward+backward at 2^20 elements, torchfast vs the eager composite
   `x * torch.sigmoid(x)`.

Everything is printed as plain lines (no cursor movement unless the output is a terminal), so the
output reads the same in a CI log.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

import torchfast
from torchfast import distributed as tfdist
from torchfast._optimize._demo import optimized_plain_mlp
from torchfast._train_demo import TrainRun, train_with_trainer
from torchfast._util import num_threads

D_IN, HIDDEN, D_OUT = 16, 128, 4
BATCH = 256
LR = 3e-3
# Training runs on one CPU thread: at these sizes (256x128 matmuls) intra-op parallelism buys nothing,
# and on a busy machine (a shared CI runner) every OpenMP barrier can wait out a scheduler slice:
# measured here under load, 300 steps took 33 s on 2 threads and 4 s on one. The speed table keeps
# torch's default thread count.
TRAIN_THREADS = 1
# Pass criterion. The teacher's targets are standardised, so the untrained model starts near loss 1;
# a model that learned nothing stays there, one that learned anything halves it within tens of steps.
LOSS_DROP = 0.5
SPEED_NUMEL = 1 << 20
SPEED_REPEATS = 15
ONNX_NAME = "torchfast_demo_mlp.onnx"


class DemoError(RuntimeError):
    """A demo stage failed; the message says which and why (the CLI prints it and exits 1)."""


@dataclass
class SpeedRow:
    dtype: str
    torchfast_ms: float
    eager_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.torchfast_ms


def busy_note() -> str | None:
    """A warning when other processes compete for the CPUs: 2-thread timings then measure the
    scheduler (an OpenMP barrier waiting out a time slice), not the kernels."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return f"machine busy (load {load:.1f} on {cores} cores): these timings are unreliable"


@dataclass
class DemoResult:
    device: str
    amp_dtype: str
    steps: int
    losses: list[float]
    loss_start: float
    loss_end: float
    train_s: float
    onnx_path: str | None = None
    onnx_max_error: float | None = None
    speed: list[SpeedRow] = field(default_factory=list)
    speed_note: str | None = None
    compress_lines: list[str] = field(default_factory=list)  # torchfast.compress.demo_stage
    world_size: int = 1
    log_dir: str | None = None
    trace: str | None = None
    activations: str = ""
    train_note: str | None = None


# ---------------------------------------------------------------------------------------------------
# model and data


class Teacher:
    """A fixed random two-layer tanh network: a smooth target that the student can learn exactly.

    Targets are standardised with statistics of 4096 samples, so the untrained student's MSE is about 1
    whatever the seed. Batches come from a private generator: the same seed gives the same data."""

    def __init__(self, seed: int, d_in: int = D_IN, d_out: int = D_OUT, width: int = 64):
        self.gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(d_in, width, generator=self.gen) / math.sqrt(d_in)
        self.w2 = torch.randn(width, d_out, generator=self.gen) / math.sqrt(width)
        self.d_in = d_in
        y = self._raw(torch.randn(4096, d_in, generator=self.gen))
        self.mean, self.std = y.mean(0), y.std(0)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1) @ self.w2

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.d_in, generator=self.gen)
        return x, (self._raw(x) - self.mean) / self.std


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was asked for, but no CUDA GPU is visible to torch")
    return torch.device(name)


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 keeps fp32's exponent range, so it trains without loss scaling; older GPUs lack it."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# stages


def train(model: nn.Module, teacher: Teacher, steps: int, device: torch.device, amp_dtype: torch.dtype,
          out: Path, progress: TextIO | None = None) -> TrainRun:
    """`steps` global batches of BATCH samples from the teacher, one epoch of torchfast.Trainer (AdamW on
    MSE, autocast per `amp_dtype`, DDP under torchrun, TensorBoard logs and a profiler trace under
    `out`, an activation summary). Returns the TrainRun (losses per step, the first the untrained
    model's; seconds of the steps)."""
    x, y = teacher.batch(steps * BATCH)
    amp = "fp16" if amp_dtype == torch.float16 else "bf16"
    return train_with_trainer(model, x, y, global_batch=BATCH, lr=LR, amp=amp, out=out, progress=progress)


def loss_summary(losses: list[float]) -> tuple[float, float]:
    """(start, end): the untrained model's loss, and the mean of the last tenth of the run (at most 10
    steps), which evens out the batch-to-batch noise of the final value."""
    k = max(1, min(10, len(losses) // 10))
    return losses[0], sum(losses[-k:]) / k


def export(model: nn.Module, example: torch.Tensor, out_dir: Path) -> tuple[str, float]:
    """Export through torchfast.export.onnx with a dynamic batch axis, verified in onnxruntime."""
    try:
        from torchfast import export as tf_export
    except ImportError as e:
        raise DemoError(f"torchfast.export is not available ({e}); install the onnx extra: "
                        "pip install 'torchfast[onnx]'") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    path, max_err = tf_export.onnx(model, (example,), out_dir / ONNX_NAME, dynamic_batch=True, verify=True)
    return str(path), float(max_err)


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fwd_bwd(f: Callable, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        f(x).backward(g)

    return run


def swish_speed(device: torch.device, numel: int = SPEED_NUMEL, repeats: int = SPEED_REPEATS,
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> list[SpeedRow]:
    """Median time of swish forward+backward on `numel` elements: torchfast.swish vs x*sigmoid(x).

    A quick look, not the benchmark (benchmarks/bench_swish.py sweeps sizes, counts bandwidth and
    fixes the thread count)."""
    rows = []
    for dtype in dtypes:
        x = torch.randn(numel, device=device, dtype=dtype).requires_grad_()
        g = torch.randn_like(x)
        rows.append(SpeedRow(
            dtype=_name(dtype),
            torchfast_ms=_median_ms(_fwd_bwd(torchfast.swish, x, g), device, repeats),
            eager_ms=_median_ms(_fwd_bwd(lambda t: t * torch.sigmoid(t), x, g), device, repeats),
        ))
    return rows


# ---------------------------------------------------------------------------------------------------
# report


def format_build_line(info: dict) -> str:
    if info["compiled"]:
        isa = f"cpu isa {info['cpu_isa_active']} (built: {', '.join(info['cpu_isas'])})"
        cuda = f"cuda kernels: {info['cuda_arch_list']}" if info["cuda_kernels"] else "cuda kernels: no"
        compiled = "compiled _C: yes"
    else:
        compiled, isa, cuda = f"compiled _C: NO, reference kernels ({info['load_error']})", "", ""
    parts = [f"torchfast {info['torchfast']}", f"torch {info['torch']}", compiled, isa, cuda,
             f"triton: {'yes' if info['triton'] else 'no'}", f"gpu: {info['gpu'] or 'none'}"]
    return " | ".join(p for p in parts if p)


def format_summary(result: DemoResult, info: dict) -> str:
    ratio = result.loss_end / result.loss_start
    threads = f" ({TRAIN_THREADS} thread)" if result.device == "cpu" else ""
    if result.world_size > 1:
        threads += f", {result.world_size} processes (DDP, batch {BATCH // result.world_size} each)"
    lines = [
        "",
        "torchfast demo: summary",
        f"  build    {format_build_line(info)}",
        (f"  train    {result.steps} steps, batch {BATCH}, MLP {D_IN}-{HIDDEN}-{HIDDEN}-{D_OUT} (plain "
         f"nn.Linear + nn.SiLU, optimized), autocast {result.amp_dtype} on {result.device}{threads}, "
         f"{result.train_s:.1f} s"),
        (f"  loss     start {result.loss_start:.4f} -> end {result.loss_end:.4f}  "
         f"({ratio:.3f}x of start; must be < {LOSS_DROP})"),
    ]
    if result.log_dir is not None:
        lines.append(f"  logs     {result.log_dir}  (TensorBoard: tensorboard --logdir {result.log_dir})")
    if result.trace is not None:
        lines.append(f"  profile  {result.trace}  (steps 3-5; open in TensorBoard or https://ui.perfetto.dev)")
    if result.train_note:
        lines.append(f"  logs     {result.train_note}")
    if result.activations:
        lines.append("  acts     activations of the trained model (torchfast.hooks.ActivationStats)")
        lines += [f"           {line}" for line in result.activations.splitlines()]
    if result.onnx_path is not None:
        lines.append(f"  onnx     {result.onnx_path}  (verified in onnxruntime, dynamic batch; "
                     f"max abs error {result.onnx_max_error:.2e})")
    lines += result.compress_lines
    if result.speed:
        lines += [
            (f"  speed    swish forward+backward, {SPEED_NUMEL:,} elements, median of {SPEED_REPEATS}, "
             f"{result.device}, {torch.get_num_threads()} threads"),
            f"           {'dtype':<10}{'torchfast':>12}{'x*sigmoid(x)':>15}{'speedup':>10}",
        ]
        lines += [f"           {r.dtype:<10}{r.torchfast_ms:>9.3f} ms{r.eager_ms:>12.3f} ms{r.speedup:>9.2f}x"
                  for r in result.speed]
        if result.speed_note:
            lines.append(f"           ({result.speed_note})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the job


def run(steps: int = 300, out: str | Path = "out", seed: int = 0, device: str = "auto",
        log: TextIO | None = None, progress: TextIO | None = None) -> DemoResult | None:
    """Run the demo (see the module docstring); print stages to `log`, the bar to `progress`.

    Under torchrun every process trains its share of each batch; rank 0 alone prints, exports and
    times, and the other ranks return None after training. Returns the results; raises DemoError when
    a stage fails (the loss did not fall, export failed)."""
    log = log if log is not None else sys.stdout
    dev = pick_device(device)
    world = tfdist.init(device=dev.type)
    dev = world.device
    if not world.is_main:
        log = progress = None
    amp_dtype = amp_dtype_for(dev)
    torch.manual_seed(seed)  # the student's initial weights
    teacher = Teacher(seed)
    # Drop-in optimize: the model is written without torchfast; optimize swaps the fused modules in.
    model, report = optimized_plain_mlp(D_IN, HIDDEN, D_OUT)
    _say(report.table(), log)
    ranks = f", {world.world_size} processes" if world.distributed else ""
    _say(f"torchfast demo: training {steps} steps on {dev} (autocast {_name(amp_dtype)}, seed {seed}{ranks})",
         log)

    try:
        with num_threads(TRAIN_THREADS) if dev.type == "cpu" else contextlib.nullcontext():
            run_ = train(model, teacher, steps, dev, amp_dtype, Path(out), progress=progress)
    finally:
        tfdist.cleanup()  # no collective follows: rank 0 exports and times alone
    start, end = loss_summary(run_.losses)
    result = DemoResult(device=str(dev), amp_dtype=_name(amp_dtype), steps=len(run_.losses),
                        losses=run_.losses, loss_start=start, loss_end=end, train_s=run_.seconds,
                        world_size=run_.world_size, log_dir=run_.log_dir, trace=run_.trace,
                        activations=run_.activations, train_note=run_.note)
    if not end < LOSS_DROP * start:
        raise DemoError(f"the loss did not fall enough: start {start:.4f}, end {end:.4f} "
                        f"({end / start:.3f}x of start; needed < {LOSS_DROP}x). Try more --steps.")
    if not world.is_main:
        return None

    print("torchfast demo: exporting to ONNX and checking it in onnxruntime", file=log, flush=True)
    model = model.cpu().eval()
    example, _ = teacher.batch(8)
    try:
        result.onnx_path, result.onnx_max_error = export(model, example, Path(out))
    except DemoError:
        raise
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        raise DemoError(f"ONNX export failed: {type(e).__name__}: {e}") from e

    # -- compression (torchfast/compress/_demo.py): prune + shrink, int8, ONNX int8, one table --------
    print("torchfast demo: compressing (prune + shrink, int8, ONNX int8)", file=log, flush=True)
    from torchfast.compress import demo_stage

    try:
        result.compress_lines = demo_stage(model, teacher.batch(BATCH)[0])
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        raise DemoError(f"compression failed: {type(e).__name__}: {e}") from e

    print("torchfast demo: timing swish", file=log, flush=True)
    result.speed = swish_speed(dev)
    result.speed_note = busy_note() if dev.type == "cpu" else None
    return result


def _say(text: str, log: TextIO | None) -> None:
    if log is not None:
        print(text, file=log, flush=True)
