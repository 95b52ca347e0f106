"""What bench_rms_norm.py and bench_layer_norm.py share: rows x hidden cases on the harness, the
correctness check before timing, the tables, and the target summary.

A normalization bench declares, per op, a `NormBench`: how to build the inputs, the variants (each a
forward taking the inputs), the float64 reference, the bytes one call must move, and its targets.
Modes: "fwd" (no grad) and "fwd+bwd" (torch.autograd.grad of every output with fixed upstream
gradients, into x and the parameters: what a training step asks for).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, however this file was loaded
import harness as H  # noqa: E402
from torchfast.testing import assert_close  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MODES = ("fwd", "fwd+bwd")
# rows (tokens) x hidden of real models: tokens 512..8192, hidden 1024..8192.
SHAPES = ("512x4096", "2048x2048", "2048x4096", "4096x2048", "8192x1024", "1024x8192")
QUICK_SHAPES = ("64x256",)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class NormBench:
    """name:       the op ("rms_norm", ...), used in titles and file names.
    inputs:     (rows, n, dtype, requires_grad, generator) -> dict of named tensors; parameters are
                float32 (the AMP case for bf16 activations).
    variants:   {name: fn(inputs) -> tensor or tuple}; "torchfast" first.
    reference:  fn(inputs in float64) -> outputs, to check torchfast before timing.
    elements_moved: (mode) -> activation-sized tensors one call must read + write at least.
    targets:    {(baseline, dtype): minimum fwd+bwd speedup of torchfast}.
    labels:     what each variant runs, for the header.
    """

    name: str
    inputs: Callable
    variants: dict
    reference: Callable
    elements_moved: Callable[[str], int]
    targets: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    target_note: str = ""


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def make_case(bench: NormBench, mode: str, dtype_name: str, shape: str) -> H.Case:
    dtype = DTYPES[dtype_name]
    rows, n = (int(s) for s in shape.split("x"))
    moved = bench.elements_moved(mode) * rows * n * torch.empty((), dtype=dtype).element_size()

    def setup():
        gen = torch.Generator().manual_seed(rows * 31 + n)
        inputs = bench.inputs(rows, n, dtype, mode == "fwd+bwd", gen)
        # A benchmark of a wrong result is worthless: check torchfast against float64 once per case.
        with torch.no_grad():
            got = _outputs(bench.variants["torchfast"](inputs))
            ref = _outputs(bench.reference({k: v.double() for k, v in inputs.items()}))
        for i, (a, e) in enumerate(zip(got, ref, strict=True)):
            assert_close(a, e, dtype=dtype, what=f"bench {bench.name} {dtype_name} {shape} output {i}")
        if mode == "fwd":
            def fwd(fn):
                def run():
                    with torch.no_grad():
                        return fn(inputs)
                return run

            return {name: fwd(fn) for name, fn in bench.variants.items()}
        leaves = [t for t in inputs.values() if t.requires_grad]
        grads = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in got]

        def step(fn):  # allow_unused: torchfast takes the fp32 weight, some baselines its x-dtype copy
            return lambda: torch.autograd.grad(_outputs(fn(inputs)), leaves, grads, allow_unused=True)

        return {name: H.Variant(fn=step(fn), forward=lambda fn=fn: fn(inputs))
                for name, fn in bench.variants.items()}

    params = {"mode": mode, "dtype": dtype_name, "rows": rows, "n": n, "shape": shape}
    return H.Case(f"{bench.name} {mode} {dtype_name} {shape}", params, setup, bytes_moved=moved)


def baselines(bench: NormBench) -> list[str]:
    return [v for v in bench.variants if v != "torchfast"]


def times_table(bench: NormBench, results: list[H.CaseResult]) -> str:
    names = list(bench.variants)
    headers = ["mode", "dtype", "rows x n"] + [f"{v} ms" for v in names] + [f"vs {b}" for b in baselines(bench)]
    rows = []
    for r in results:
        p = r.params
        row = [p["mode"], p["dtype"], p["shape"]] + [H.fmt_ms(r.variants[v].ms) for v in names]
        row += [H.fmt_ratio(r.speedup("torchfast", b).median) for b in baselines(bench)]
        rows.append(row)
    return H.format_table(headers, rows, f"{bench.name}: median ms per call ± half the IQR; 'vs X' = speedup "
                          "of torchfast over X (median of paired ratios; >1: torchfast is faster)")


def faults_table(bench: NormBench, results: list[H.CaseResult]) -> str:
    headers = ["mode", "dtype", "rows x n"] + list(bench.variants)
    rows = [[r.params["mode"], r.params["dtype"], r.params["shape"]]
            + ["-" if r.variants[v].faults_per_call is None else f"{r.variants[v].faults_per_call:.0f}"
               for v in bench.variants] for r in results]
    title = ("Minor page faults per call in the timed samples (getrusage): a ratio between variants whose "
             "counts differ is partly the allocator's, not the kernels'")
    return H.format_table(headers, rows, title)


def bandwidth_table(bench: NormBench, results: list[H.CaseResult]) -> str:
    headers = ["mode", "dtype", "rows x n", "copy GB/s"] + [f"{v} GB/s (%copy)" for v in bench.variants]
    rows = []
    for r in results:
        p = r.params
        row = [p["mode"], p["dtype"], p["shape"], f"{r.copy.gbps:.1f}" if r.copy else "-"]
        for v in bench.variants:
            res = r.variants[v]
            frac = f" ({res.copy_fraction * 100:.0f}%)" if res.copy_fraction is not None else ""
            row.append(f"{res.gbps:.1f}{frac}" if res.gbps else "-")
        rows.append(row)
    fwd, both = bench.elements_moved("fwd"), bench.elements_moved("fwd+bwd")
    return H.format_table(headers, rows, f"Achieved bandwidth: minimum bytes (fwd {fwd}, fwd+bwd {both} "
                          "activation-sized tensors) / median time, and as % of a same-traffic copy_")


def saved_table(bench: NormBench, results: list[H.CaseResult]) -> str:
    rows = []
    for r in results:
        p = r.params
        if p["mode"] != "fwd+bwd":
            continue
        x_bytes = p["rows"] * p["n"] * torch.empty((), dtype=DTYPES[p["dtype"]]).element_size()
        for v in bench.variants:
            s = r.variants[v].saved
            if s is not None:
                rows.append([p["dtype"], p["shape"], v, H.fmt_bytes(s.bytes), f"{s.bytes / x_bytes:.2f}", s.tensors])
    return H.format_table(["dtype", "rows x n", "variant", "saved", "× x bytes", "tensors"], rows,
                          "Saved for backward (saved_tensors_hooks, distinct tensors; parameters count too)")


def summary(bench: NormBench, results: list[H.CaseResult]) -> dict:
    """Per target (baseline, dtype): median over the shapes of the fwd+bwd speedup, PASS/FAIL."""
    out = {}
    for (b, dtype_name), need in bench.targets.items():
        per_shape = {r.params["shape"]: r.speedup("torchfast", b).median for r in results
                     if r.params["mode"] == "fwd+bwd" and r.params["dtype"] == dtype_name}
        med = H.Stats.of(list(per_shape.values())).median if per_shape else None
        status = "n/a" if med is None else ("PASS" if med >= need else "FAIL")
        out[f"torchfast vs {b} ({dtype_name})"] = {"need": need, "median": med, "per_shape": per_shape,
                                                    "status": status}
    return out


def summary_text(bench: NormBench, s: dict) -> str:
    rows = [[k, f">= {e['need']:.2f}x", "n/a" if e["median"] is None else f"{e['median']:.2f}x",
             " ".join(f"{v:.2f}" for v in e["per_shape"].values()), e["status"]] for k, e in s.items()]
    return H.format_table(["fwd+bwd speedup", "target", "median", "per shape", "result"], rows,
                          f"Targets ({bench.target_note}): median over the shapes run")


def parse_args(bench: NormBench, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Benchmark torchfast.{bench.name} on CPU (see the script's docstring)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="default: float32 bfloat16 (float32 with --quick)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="ROWSxN", help=f"default: {' '.join(SHAPES)}")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved samples per variant (default 11)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-block-ms", type=float, default=20.0, help="minimum duration of one timed sample")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall (default) or process CPU time (robust on a shared machine at --threads 1)")
    p.add_argument("--quick", action="store_true", help="one tiny shape, few repeats: a smoke test")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.shapes = args.shapes or list(QUICK_SHAPES if args.quick else SHAPES)
    for s in args.shapes:
        parts = s.split("x")
        if len(parts) != 2 or not all(q.isdigit() and int(q) > 0 for q in parts):
            p.error(f"--shapes: '{s}' is not ROWSxN with positive integers")
    args.repeats = args.repeats or (3 if args.quick else 11)
    if args.quick:
        args.warmup, args.min_block_ms = 1, min(args.min_block_ms, 1.0)
    return args


def main(bench: NormBench, argv=None) -> int:
    args = parse_args(bench, argv)
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    config = H.Config(repeats=args.repeats, warmup=args.warmup, min_block_s=args.min_block_ms / 1e3,
                      clock=args.clock)
    env = H.environment("cpu")
    ceiling = H.copy_bandwidth(16 << 20 if args.quick else 256 << 20)
    info = env["torchfast"] if isinstance(env["torchfast"], dict) else {}
    print(f"bench_{bench.name}: cpu ({env['device_name']}), torch {torch.__version__}, threads {threads}, "
          f"torchfast CPU ISA {info.get('cpu_isa_active')}, ATen {env['aten_cpu_capability']}")
    print(f"  {args.repeats} interleaved repeats, samples >= {args.min_block_ms:g} ms, clock {args.clock}; "
          f"copy_ bandwidth {ceiling:.1f} GB/s; parameters float32; outputs allocated on every call")
    for name, label in bench.labels.items():
        print(f"  {name:<12} {label}")
    load = env["load_average_1min"]
    if load is not None and load >= 1.0:
        print(f"  WARNING: load average {load:.1f} on {env['cpu_count']} CPUs before starting: other "
              "processes compete for the cores; times (and ratios at 2+ threads) are unreliable")
    cases = [make_case(bench, m, d, s) for m in args.modes for d in args.dtypes for s in args.shapes]
    t0 = time.perf_counter()
    results = H.run_cases(cases, config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    print()
    print(times_table(bench, results))
    print()
    print(faults_table(bench, results))
    print()
    print(bandwidth_table(bench, results))
    if "fwd+bwd" in args.modes:
        print()
        print(saved_table(bench, results))
    s = summary(bench, results)
    if s:
        print()
        print(summary_text(bench, s))
    payload = {
        "benchmark": bench.name, "environment": env,
        "config": {"threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                   "min_block_ms": args.min_block_ms, "clock": args.clock, "dtypes": args.dtypes,
                   "shapes": args.shapes, "modes": args.modes, "quick": args.quick, "variants": bench.labels},
        "copy_bandwidth_gbps": ceiling,
        "cases": [dict(r.as_dict(), speedup={b: r.speedup("torchfast", b).as_dict() for b in baselines(bench)})
                  for r in results],
        "summary": s, "elapsed_s": elapsed, "load_average_1min_end": H.load_average(),
    }
    path = args.json or RESULTS_DIR / f"bench_{bench.name}_cpu_{threads}t{'_quick' if args.quick else ''}.json"
    print(f"\nwrote {H.write_json(path, payload)} ({elapsed:.0f} s)")
    return 0


compiled = H.compiled  # torch.compile(fn, dynamic=False) under raised recompile limits (harness.py)

