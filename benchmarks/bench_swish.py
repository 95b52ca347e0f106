#!/usr/bin/env python
"""Benchmark torchfast.swish against PyTorch's ways of computing swish / SiLU, y = x * sigmoid(x).

Variants (all allocate their outputs on every call, which is what a user gets):
  torchfast  torchfast.swish(x): the compiled kernel ("native"); on CUDA also
  triton     torchfast.swish(x, impl="triton")
  eager      x * torch.sigmoid(x), the composite autograd differentiates op by op
  silu       torch.nn.functional.silu(x), ATen's fused kernel
  compiled   torch.compile(lambda x: x * torch.sigmoid(x), dynamic=False), one graph per shape

Modes: "fwd" (x does not require grad) and "fwd+bwd" (torch.autograd.grad of the output with a
fixed upstream gradient, so nothing accumulates into x.grad). The speedup of torchfast over a baseline
is the median of the ratios of samples taken in the same repeat (see harness.py). At the end, the
summary checks the target of issue 2 on forward+backward, float32 and bfloat16, 2^20..2^24 elements.

    python benchmarks/bench_swish.py                      # CPU, fwd and fwd+bwd, 2^16..2^24, fp32+bf16
    python benchmarks/bench_swish.py --device cuda        # also times the Triton kernels
    python benchmarks/bench_swish.py --threads 1          # one thread count per process (torch.compile)
"""

from __future__ import annotations

import os

# Inductor compiling in worker processes competes with the benchmark for the cores; set before torch.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, also under `python -m`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402
import torchfast  # noqa: E402
from torchfast.testing import assert_close  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MODES = ("fwd", "fwd+bwd")
BASELINES = ("eager", "silu", "compiled")
LABELS = {"torchfast": "torchfast", "triton": "torchfast[triton]", "eager": "eager x*sigmoid(x)",
          "silu": "F.silu", "compiled": "compile(x*sigmoid(x))"}
# Issue 2's target: forward+backward, float32 and bfloat16, 2^20..2^24 elements, median over sizes of
# torchfast's speedup over each baseline.
TARGETS = {"eager": 2.0, "silu": 1.0, "compiled": 1.0}
TARGET_MODE, TARGET_DTYPES, TARGET_LOG2 = "fwd+bwd", ("float32", "bfloat16"), range(20, 25)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def composite(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


_compiled_composite = None


def compiled_composite():
    """One compiled wrapper for the process: dynamo keys its cache on the code object, so each shape,
    dtype and requires_grad gets its own static graph (dynamic=False) under this one wrapper."""
    global _compiled_composite
    if _compiled_composite is None:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 1024))
        _compiled_composite = torch.compile(composite, dynamic=False)
    return _compiled_composite


def swish_fns(device: str) -> tuple[dict, dict]:
    """{variant: fn(x)} that can run on `device`, and {variant: why not} for the ones that cannot."""
    fns = {}
    skipped = {}
    probe = torch.randn(8, device=device)
    impls = {"torchfast": "native"}
    if device.startswith("cuda"):
        impls["triton"] = "triton"  # on CPU Triton only runs in its interpreter: not a speed to report
    for name, impl in impls.items():
        try:
            torchfast.swish(probe, impl=impl)
            fns[name] = lambda x, impl=impl: torchfast.swish(x, impl=impl)
        except (RuntimeError, ImportError) as e:
            skipped[name] = str(e).splitlines()[0]
    fns.update(eager=composite, silu=F.silu, compiled=compiled_composite())
    return fns, skipped


def make_case(mode: str, dtype_name: str, log2n: int, device: str, fns: dict) -> H.Case:
    dtype = DTYPES[dtype_name]
    n = 1 << log2n
    esize = torch.empty((), dtype=dtype).element_size()
    # fwd reads x, writes y; fwd+bwd adds the backward's read of grad_out and x and write of grad_in.
    moved = (2 if mode == "fwd" else 5) * n * esize

    def setup():
        gen = torch.Generator(device=device).manual_seed(log2n)
        x = torch.randn(n, device=device, dtype=dtype, generator=gen)
        # A benchmark of a wrong result is worthless: check torchfast against float64 once per case.
        expected = F.silu(x.double())
        for name in ("torchfast", "triton"):
            if name in fns:
                assert_close(fns[name](x), expected, dtype=dtype,
                             what=f"bench_swish {name} {dtype_name} 2^{log2n}")
        if mode == "fwd":
            return {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
        xg = x.clone().requires_grad_(True)
        g = torch.randn(n, device=device, dtype=dtype, generator=gen)
        return {
            name: H.Variant(fn=lambda fn=fn: torch.autograd.grad(fn(xg), xg, g), forward=lambda fn=fn: fn(xg))
            for name, fn in fns.items()
        }

    params = {"mode": mode, "dtype": dtype_name, "log2_numel": log2n, "numel": n}
    return H.Case(f"{mode} {dtype_name} 2^{log2n}", params, setup, bytes_moved=moved)


def speedups(result: H.CaseResult, targets: list[str]) -> dict:
    return {t: {b: result.speedup(t, b).as_dict() for b in BASELINES if b in result.variants}
            for t in targets if t in result.variants}


def times_table(results: list[H.CaseResult], names: list[str], targets: list[str]) -> str:
    headers = ["mode", "dtype", "numel"] + [f"{n} ms" for n in names]
    pairs = [(t, b) for t in targets for b in BASELINES]
    headers += [f"{t}÷{b}" if len(targets) > 1 else f"vs {b}" for t, b in pairs]
    rows = []
    for r in results:
        p = r.params
        row = [p["mode"], p["dtype"], f"2^{p['log2_numel']}"]
        row += [H.fmt_ms(r.variants[n].ms) if n in r.variants else "-" for n in names]
        row += [H.fmt_ratio(r.speedup(t, b).median) if t in r.variants and b in r.variants else "-"
                for t, b in pairs]
        rows.append(row)
    title = ("Times: median ms per call ± half the IQR; 'vs X' = speedup of torchfast over X "
             "(median of paired ratios; >1 means torchfast is faster)")
    return H.format_table(headers, rows, title)


def bandwidth_table(results: list[H.CaseResult], names: list[str]) -> str:
    headers = ["mode", "dtype", "numel", "copy GB/s"] + [f"{n} GB/s (%copy)" for n in names]
    rows = []
    for r in results:
        p = r.params
        row = [p["mode"], p["dtype"], f"2^{p['log2_numel']}", f"{r.copy.gbps:.1f}" if r.copy else "-"]
        for n in names:
            v = r.variants.get(n)
            if v is None or v.gbps is None:
                row.append("-")
            else:
                frac = f" ({v.copy_fraction * 100:.0f}%)" if v.copy_fraction is not None else ""
                row.append(f"{v.gbps:.1f}{frac}")
        rows.append(row)
    title = ("Achieved bandwidth: minimum bytes moved (fwd 2n, fwd+bwd 5n elements) / median time, and "
             "as % of a same-traffic copy_ timed in the same interleaving")
    return H.format_table(headers, rows, title)


def saved_table(results: list[H.CaseResult], names: list[str]) -> str:
    """Saved bytes per variant at the largest size of each dtype, as a multiple of x's bytes."""
    last = {}
    for r in results:
        if r.params["mode"] == "fwd+bwd":
            last[r.params["dtype"]] = r  # sizes run in increasing order
    rows = []
    for dtype_name, r in last.items():
        x_bytes = r.params["numel"] * torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        for n in names:
            s = r.variants[n].saved if n in r.variants else None
            if s is not None:
                rows.append([dtype_name, f"2^{r.params['log2_numel']}", n, H.fmt_bytes(s.bytes),
                             f"{s.bytes / x_bytes:.2f}", s.tensors, s.saves])
    headers = ["dtype", "numel", "variant", "saved", "× x bytes", "tensors", "saves"]
    return H.format_table(headers, rows, "Saved for backward (saved_tensors_hooks; distinct tensors, "
                          "a tensor saved twice counts once)")


def summary(results: list[H.CaseResult], targets: list[str]) -> dict:
    """Issue 2's target: median over 2^20..2^24 of the per-size speedup, per dtype, with PASS/FAIL."""
    out = {"mode": TARGET_MODE, "log2_sizes": list(TARGET_LOG2), "targets": {}}
    for t in targets:
        for b, need in TARGETS.items():
            per_dtype = {}
            for dtype_name in TARGET_DTYPES:
                ratios = {r.params["log2_numel"]: r.speedup(t, b).median for r in results
                          if r.params["mode"] == TARGET_MODE and r.params["dtype"] == dtype_name
                          and r.params["log2_numel"] in TARGET_LOG2 and t in r.variants and b in r.variants}
                if ratios:
                    med = H.Stats.of(list(ratios.values())).median
                    per_dtype[dtype_name] = {"median": med, "per_size": ratios,
                                             "status": "PASS" if med >= need else "FAIL"}
                else:
                    per_dtype[dtype_name] = {"median": None, "per_size": {}, "status": "n/a"}
            statuses = [d["status"] for d in per_dtype.values()]
            overall = ("n/a" if "n/a" in statuses else "FAIL" if "FAIL" in statuses else "PASS")
            out["targets"][f"{t} vs {b}"] = {"need": need, "dtypes": per_dtype, "status": overall}
    return out


def summary_text(s: dict) -> str:
    rows = []
    for key, entry in s["targets"].items():
        row = [key, f">= {entry['need']:.2f}x"]
        for dtype_name in TARGET_DTYPES:
            d = entry["dtypes"][dtype_name]
            row.append("n/a" if d["median"] is None else f"{d['median']:.3f}x {d['status']}")
        row.append(entry["status"])
        rows.append(row)
    title = (f"Target (issue 2): {s['mode']}, 2^{s['log2_sizes'][0]}..2^{s['log2_sizes'][-1]} elements, "
             "median over sizes of torchfast's speedup ('n/a': those sizes or dtypes were not run)")
    return H.format_table(["speedup", "target", *TARGET_DTYPES, "result"], rows, title)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="default: float32 bfloat16 (float32 with --quick)")
    p.add_argument("--sizes", nargs="+", type=int, default=None, metavar="LOG2",
                   help="log2 of the element counts; default 16..24 (12 with --quick)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved samples per variant (default 21)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant before timing")
    p.add_argument("--min-block-ms", type=float, default=5.0, help="minimum duration of one timed sample")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="CPU timer: wall (default) or process CPU time (robust on a shared machine "
                        "at --threads 1; see benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    p.add_argument("--json", default=None, help="where to write results (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    if args.device == "cuda" and args.clock != "wall":
        p.error("--clock process measures CPU time; on CUDA the times come from CUDA events")
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.sizes = sorted(set(args.sizes or ([12] if args.quick else list(range(16, 25)))))
    if any(not 0 <= s <= 34 for s in args.sizes):
        p.error(f"--sizes are log2 element counts in 0..34, got {args.sizes}")
    args.repeats = args.repeats or (3 if args.quick else 21)
    if args.quick:
        args.warmup = min(args.warmup, 2)
        args.min_block_ms = min(args.min_block_ms, 1.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and the stderr progress lines in order
    threads = H.set_threads(args.threads)
    device = args.device
    config = H.Config(device=device, repeats=args.repeats, warmup=args.warmup,
                      min_block_s=args.min_block_ms / 1e3, clock=args.clock)
    fns, skipped = swish_fns(device)
    names = list(fns)
    targets = [t for t in ("torchfast", "triton") if t in fns]
    if "torchfast" not in fns:
        print(f"note: torchfast's compiled kernel is not available ({skipped.get('torchfast')}); "
              "there is nothing to compare", file=sys.stderr)

    env = H.environment(device)
    ceiling = H.copy_bandwidth(16 << 20 if args.quick else 256 << 20, device)
    info = env["torchfast"] if isinstance(env["torchfast"], dict) else {}
    print(f"bench_swish: {device} ({env['device_name']}), torch {torch.__version__}, "
          f"threads {threads} (torch.set_num_threads), torchfast CPU ISA {info.get('cpu_isa_active')}, "
          f"ATen {env['aten_cpu_capability']}")
    if args.quick:
        print(f"  quick mode: {args.repeats} repeats; copy_ bandwidth {ceiling:.1f} GB/s")
    else:
        print(f"  {args.repeats} interleaved repeats, warm-up {args.warmup}, "
              f"samples >= {args.min_block_ms:g} ms; "
              f"copy_ bandwidth {ceiling:.1f} GB/s (read+write, 256 MiB buffers)")
    if args.clock == "process":
        print(f"  clock: process CPU time (user+system, summed over {threads} thread(s)), not wall time")
    print("  every variant allocates its outputs (no out=): page faults of fresh outputs are included")
    load = env["load_average_1min"]
    if device == "cpu" and load is not None and load >= 1.0:
        print(f"  WARNING: load average {load:.1f} on {env['cpu_count']} CPUs before starting: other "
              "processes compete for the cores; times (and ratios at 2+ threads) are unreliable")
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}")

    cases = [make_case(m, d, s, device, fns) for m in args.modes for d in args.dtypes for s in args.sizes]
    t0 = time.perf_counter()
    results = H.run_cases(cases, config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0

    print()
    print(times_table(results, names, targets))
    print()
    print(bandwidth_table(results, names))
    if "fwd+bwd" in args.modes:
        print()
        print(saved_table(results, names))
    s = summary(results, targets)
    print()
    print(summary_text(s))

    payload = {
        "benchmark": "swish",
        "environment": env,
        "config": {"device": device, "threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                   "min_block_ms": args.min_block_ms, "clock": args.clock, "dtypes": args.dtypes,
                   "log2_sizes": args.sizes, "modes": args.modes, "quick": args.quick,
                   "variants": {n: LABELS[n] for n in names}, "skipped": skipped},
        "copy_bandwidth_gbps": ceiling,
        "cases": [dict(r.as_dict(), speedup=speedups(r, targets)) for r in results],
        "summary": s,
        "elapsed_s": elapsed,
        "load_average_1min_end": H.load_average(),
    }
    path = args.json or RESULTS_DIR / f"bench_swish_{device}_{threads}t{'_quick' if args.quick else ''}.json"
    written = H.write_json(path, payload)
    print(f"\nwrote {written} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
