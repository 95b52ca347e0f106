"""Shared benchmark harness for torchfast's per-op benchmarks (benchmarks/bench_<op>.py).

A bench declares `Case`s: a name, parameters, and a `setup()` that builds the inputs and returns one
zero-argument callable (or `Variant`) per implementation. `run_case` then

  * warms every variant up (torch.compile compiles here) and picks, per variant, how many calls one
    timed sample makes so that a sample lasts at least `Config.min_block_s`;
  * takes `Config.repeats` samples of every variant, interleaved (repeat r runs all variants, in an
    order rotated by r), so machine noise and allocator state hit all variants alike; the samples of
    two variants taken in the same repeat form a pair, and a speedup is the median of the paired
    ratios, not a ratio of two medians taken minutes apart;
  * optionally times a same-sized `copy_` (a read + write memcpy ceiling on the same device) in the
    same interleaving, so achieved GB/s can be read as a fraction of what memory can deliver here;
  * counts the bytes autograd saves for backward, through `torch.autograd.graph.saved_tensors_hooks`.

Times are wall-clock per call; on CUDA they come from CUDA events around the block, synchronized.
Variants allocate their outputs on every call (that is what a user gets): on CPU a fresh large output
costs page faults, which are part of the measured time.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

try:
    import resource  # POSIX only
except ImportError:
    resource = None

# -- statistics ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median and spread of a list of samples. Quartiles interpolate linearly between order
    statistics (numpy's default `percentile`): q1 is the 25th percentile, q3 the 75th."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("Stats.of: no samples")
        xs = sorted(float(s) for s in samples)
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_spread(self) -> float:
        """Half the interquartile range relative to the median: the "±" printed next to a time."""
        return 0.5 * self.iqr / self.median if self.median else float("nan")

    def scaled(self, factor: float) -> Stats:
        return Stats(self.median * factor, self.q1 * factor, self.q3 * factor, self.min * factor,
                     self.max * factor, self.n)

    def as_dict(self) -> dict:
        return asdict(self)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """num[i] / den[i] for samples taken in the same repeat (see module docstring)."""
    if len(numerators) != len(denominators):
        raise ValueError("paired_ratios: the two sample lists must have the same length")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


# -- saved activations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedBytes:
    """What autograd kept for backward after one forward.

    bytes:   sum of numel * element_size over the distinct tensors saved (a tensor saved twice, as
             `x * sigmoid(x)` saves sigmoid(x), counts once: it is one allocation kept alive);
    packed_bytes: the same sum over every save, repeats included;
    tensors: number of distinct tensors saved; saves: number of saves.
    """

    bytes: int
    packed_bytes: int
    tensors: int
    saves: int


def saved_bytes(forward: Callable[[], Any]) -> SavedBytes:
    """Run `forward()` (which must build an autograd graph) under saved_tensors_hooks and count what
    the graph saves. The output is dropped afterwards, which frees the graph and what it saved."""
    seen: set[tuple] = set()
    total = packed = saves = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total, packed, saves
        nbytes = t.numel() * t.element_size()
        saves += 1
        packed += nbytes
        # Every saved tensor stays alive until the graph dies, so two distinct saved tensors cannot
        # share an address unless they are views of one storage; the key tells views apart.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype, t.device)
        if key not in seen:
            seen.add(key)
            total += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return SavedBytes(total, packed, len(seen), saves)


# -- cases and configuration --------------------------------------------------------------------------


@dataclass
class Variant:
    """One implementation in a case.

    fn:      one timed call (e.g. forward, or forward+backward); its result is dropped.
    forward: optional; builds the autograd graph fn would build, for `saved_bytes`.
    """

    fn: Callable[[], Any]
    forward: Callable[[], Any] | None = None


@dataclass
class Case:
    """One row of a benchmark.

    setup:       builds inputs, returns {variant name: Variant or callable}; called once per run.
    bytes_moved: the bytes one call must at least read and write (each input read once, each output
                 written once, nothing else): the same for every variant, so GB/s compare fairly.
    """

    name: str
    params: dict
    setup: Callable[[], Mapping[str, Variant | Callable[[], Any]]]
    bytes_moved: int | None = None


@dataclass
class Config:
    device: str = "cpu"
    repeats: int = 21
    warmup: int = 3
    min_block_s: float = 5e-3  # a timed sample runs a variant enough times to last at least this
    max_block_calls: int = 10_000
    copy_ceiling: bool = True  # time a same-traffic copy_ in the interleaving
    clock: str = "wall"  # or "process": see time_block


COPY = "copy"  # the name of the copy-ceiling pseudo-variant in results


@dataclass
class VariantResult:
    name: str
    ms: Stats
    samples_ms: list[float]
    calls_per_sample: int
    gbps: float | None = None
    copy_fraction: float | None = None
    saved: SavedBytes | None = None
    faults_per_call: float | None = None  # minor page faults per call over the timed samples (CPU)

    def as_dict(self) -> dict:
        d = {"ms": self.ms.as_dict(), "samples_ms": self.samples_ms,
             "calls_per_sample": self.calls_per_sample,
             "gbps": self.gbps, "copy_fraction": self.copy_fraction, "faults_per_call": self.faults_per_call}
        if self.saved is not None:
            d["saved"] = asdict(self.saved)
        return d


@dataclass
class CaseResult:
    name: str
    params: dict
    bytes_moved: int | None
    variants: dict[str, VariantResult]
    copy: VariantResult | None = None

    def speedup(self, target: str, baseline: str) -> Stats:
        """How many times faster `target` ran than `baseline`: median and spread of the paired ratios
        baseline_time / target_time over the repeats."""
        return Stats.of(paired_ratios(self.variants[baseline].samples_ms, self.variants[target].samples_ms))

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "params": self.params,
            "bytes_moved": self.bytes_moved,
            "copy": self.copy.as_dict() if self.copy else None,
            "variants": {k: v.as_dict() for k, v in self.variants.items()},
        }


# -- timing -------------------------------------------------------------------------------------------


_COMPILED: dict = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn, dynamic=False), one wrapper per function for the process (dynamo caches a static
    graph per shape, dtype and requires_grad under it), with the recompile limits raised so that a full
    run's cases all compile instead of falling back to eager."""
    if fn not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 1024))
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def set_threads(n: int | None) -> int:
    """Fix torch's intra-op thread count (None keeps the current one) and return it."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def status_kb(key: str) -> int:
    """A kB counter of /proc/self/status (VmRSS, VmHWM, ...) of this process; -1 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where Linux's clear_refs is missing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def minor_faults() -> int | None:
    """Minor page faults of this process so far (getrusage), None where there is no resource module.
    A fresh large output is paid for in such faults, and whether a call takes them depends on the
    allocator's state (which freed blocks it reuses, whether it returned the heap's top to the OS),
    not only on the op: two variants' times compare the kernels only where their faults per call do."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_block(fn: Callable[[], Any], calls: int, device: str = "cpu", clock: str = "wall") -> float:
    """Seconds per call of `fn` over `calls` back-to-back calls. On CUDA the block is bracketed by
    events after a synchronize, so queued work from before does not leak into the sample.

    On CPU, clock "wall" is elapsed time (what a user waits). "process" is the CPU time of the whole
    process (user + system, page faults included, summed over threads): with one thread it leaves out
    the time the process was descheduled, so it stays meaningful on a machine shared with other work;
    with several threads it adds them up, spin-waiting included, and is not a latency."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    now = CLOCKS[clock]
    t0 = now()
    for _ in range(calls):
        fn()
    return (now() - t0) / calls


def _copy_variant(nbytes: int, device: str) -> Callable[[], Any]:
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu", repeats: int = 11) -> float:
    """GB/s (1e9 bytes/s, read + write counted) of `dst.copy_(src)` with preallocated buffers of
    `nbytes` each: the memory ceiling an elementwise kernel of that traffic can hope for."""
    fn = _copy_variant(nbytes, device)
    for _ in range(2):
        fn()
    _sync(device)
    t = statistics.median(time_block(fn, 1, device) for _ in range(repeats))
    return 2 * (nbytes // 4) * 4 / t / 1e9


def _calls_for(fn: Callable[[], Any], config: Config) -> int:
    # The fastest of three single calls: one call that happened to be descheduled must not shrink the
    # block to a single call for the whole run.
    t = max(min(time_block(fn, 1, config.device) for _ in range(3)), 1e-7)  # wall: a block's length
    return max(1, min(config.max_block_calls, math.ceil(config.min_block_s / t)))


def run_case(case: Case, config: Config) -> CaseResult:
    """Warm up, calibrate, count saved bytes, then take interleaved samples (module docstring)."""
    if config.clock not in CLOCKS or (config.clock != "wall" and config.device != "cpu"):
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)} ('process' on CPU only), "
                         f"got '{config.clock}' on {config.device}")
    variants = {k: (v if isinstance(v, Variant) else Variant(v)) for k, v in case.setup().items()}
    if config.copy_ceiling and case.bytes_moved:
        # The copy reads and writes bytes_moved / 2 each way: the same traffic as one call.
        variants[COPY] = Variant(_copy_variant(case.bytes_moved // 2, config.device))
    for v in variants.values():
        for _ in range(config.warmup):
            v.fn()
    _sync(config.device)
    calls = {k: _calls_for(v.fn, config) for k, v in variants.items()}
    saved = {k: saved_bytes(v.forward) for k, v in variants.items() if v.forward is not None}

    names = list(variants)
    samples: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, int] = {k: 0 for k in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one variant's sample would charge it alone
    try:
        for r in range(config.repeats):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                before = minor_faults()
                samples[k].append(time_block(variants[k].fn, calls[k], config.device, config.clock) * 1e3)
                if before is not None:
                    faults[k] += minor_faults() - before
    finally:
        if gc_was_enabled:
            gc.enable()

    results = {}
    for k in names:
        ms = Stats.of(samples[k])
        moved = 2 * (case.bytes_moved // 2 // 4) * 4 if k == COPY else case.bytes_moved
        gbps = moved / (ms.median / 1e3) / 1e9 if moved else None
        per_call = faults[k] / (calls[k] * config.repeats) if config.device == "cpu" and resource else None
        results[k] = VariantResult(k, ms, samples[k], calls[k], gbps, saved=saved.get(k),
                                   faults_per_call=per_call)
    copy = results.pop(COPY, None)
    if copy is not None:
        for res in results.values():
            res.copy_fraction = res.gbps / copy.gbps if res.gbps else None
    del variants
    gc.collect()
    return CaseResult(case.name, case.params, case.bytes_moved, results, copy)


def run_cases(cases: Sequence[Case], config: Config, progress: Callable[[str], None] | None = None
              ) -> list[CaseResult]:
    out = []
    for i, case in enumerate(cases):
        if progress:
            progress(f"[{i + 1}/{len(cases)}] {case.name}")
        out.append(run_case(case, config))
    return out


# -- reporting ----------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: text columns left-aligned, everything else right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(row):
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _cell(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)


def _looks_numeric(s: str) -> bool:
    return s == "-" or (bool(s) and (s[0].isdigit() or (len(s) > 1 and s[0] in "-+." and s[1].isdigit())))


def fmt_ms(stats: Stats) -> str:
    """'1.234±2%': median milliseconds, ± half the IQR relative to the median."""
    return f"{_sig(stats.median)}±{stats.rel_spread * 100:.0f}%"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _sig(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS does not report it.
    Above about 1 before a CPU benchmark starts, something else is competing for the cores."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: str) -> dict:
    """What a result depends on: versions, device, threads, relevant environment variables."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_COMPILE_THREADS", "OMP_NUM_THREADS",
                                               "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY")},
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torchfast

        info["torchfast"] = torchfast.build_info()
    except Exception as e:  # a bench of references alone still runs
        info["torchfast"] = f"import failed: {type(e).__name__}: {e}"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented JSON (NaN/inf are written as null), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1) + "\n")
    return path


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
