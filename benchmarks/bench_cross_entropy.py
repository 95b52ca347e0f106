#!/usr/bin/env python
"""Benchmark torchfast.cross_entropy and torchfast.linear_cross_entropy on CPU (issue 12).

Every timed call is forward + backward: the loss (reduction "mean", class-index targets), then
torch.autograd.grad into the inputs that require grad. Variants:
  cross_entropy (--part ce), logits [N, V] requiring grad:
    torchfast  torchfast.cross_entropy(logits, target)
    eager      F.cross_entropy(logits, target)
    compiled   torch.compile(F.cross_entropy, dynamic=False)
  linear_cross_entropy (--part linear), hidden [N, H] and weight [V, H] both requiring grad:
    torchfast  torchfast.linear_cross_entropy(hidden, weight, target)   (chunked, default chunk size)
    eager      F.cross_entropy(F.linear(hidden, weight), target)
    compiled   torch.compile of those two calls, dynamic=False
  peak memory (--part memory): each linear variant runs one step in a fresh subprocess; the number is
    the growth of the process's peak RSS from after the inputs exist to after the step, gradients
    included: VmHWM of /proc/self/status, reset (/proc/self/clear_refs, "5") once the inputs exist
    (ru_maxrss where /proc is missing; in a child it also holds its parent's RSS, see memory_child).
    Each child then resets the peak again and runs a second step, whose growth is the figure compared
    (steady state: the first step also pages in library code and, compiled, compiles); both are kept.

Timing: the cross_entropy cases use the harness (warm-up, calibrated blocks, interleaved repeats, a
same-traffic copy_ ceiling, saved-tensor bytes). A linear step is seconds to a minute of GEMMs here, so
those cases take one call per sample and warm up only the compiled variant (its first call compiles):
`--linear-repeats` interleaved samples (default 3), rotated order, paired ratios as in the harness.

Targets of issue 12 (fwd+bwd): cross_entropy >= 2x eager and >= 1.2x compiled, float32 and bfloat16;
linear_cross_entropy >= 1.0x eager and compiled, and peak-RSS growth <= 0.2x eager's.

    python benchmarks/bench_cross_entropy.py                       # everything: about 25 min on 2 cores
    python benchmarks/bench_cross_entropy.py --part ce --vocabs 32000 128256
    python benchmarks/bench_cross_entropy.py --part linear memory --vocabs 32000
    python benchmarks/bench_cross_entropy.py --quick               # small sizes: a smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # before torch: compile in-process

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402
import torchfast  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PARTS = ("ce", "linear", "memory")
VARIANTS = ("torchfast", "eager", "compiled")
CE_TARGETS = {"eager": 2.0, "compiled": 1.2}
LINEAR_TARGETS = {"eager": 1.0, "compiled": 1.0}
MEMORY_TARGET = 0.2  # torchfast's peak-RSS growth / eager's, at most
# A wrong result is not worth timing: torchfast's loss against eager's in the same dtype.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK = {"tokens": 64, "hidden": 64, "vocabs": [1000]}


def _linear_ce(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target)


def loss_fns(part: str, chunk_size: int | None = None) -> dict:
    """{variant: loss function} of a part (the compiled wrapper is one per process, harness.compiled).
    `chunk_size`: linear_cross_entropy's (None: its default)."""
    if part == "ce":
        return {"torchfast": torchfast.cross_entropy, "eager": F.cross_entropy, "compiled": H.compiled(F.cross_entropy)}
    return {"torchfast": functools.partial(torchfast.linear_cross_entropy, chunk_size=chunk_size), "eager": _linear_ce,
            "compiled": H.compiled(_linear_ce)}


# Inputs are drawn directly in their dtype: a float32 temporary converted to bfloat16 would raise the
# peak RSS before the memory measurement starts and hide part of the growth.

def ce_inputs(n: int, v: int, dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(n * 7 + v)
    logits = torch.randn(n, v, dtype=dtype, generator=gen).mul_(2).requires_grad_()
    return (logits, torch.randint(0, v, (n,), generator=gen)), [logits]


def linear_inputs(n: int, h: int, v: int, dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(n * 7 + h * 3 + v)
    hidden = torch.randn(n, h, dtype=dtype, generator=gen).requires_grad_()
    weight = torch.randn(v, h, dtype=dtype, generator=gen).mul_(h ** -0.5).requires_grad_()
    return (hidden, weight, torch.randint(0, v, (n,), generator=gen)), [hidden, weight]


def step(fn, args, leaves):
    """One training step of a loss: (loss, gradients of the leaves)."""
    def run():
        loss = fn(*args)
        return loss, torch.autograd.grad(loss, leaves)
    return run


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def _check(case: str, dtype_name: str, got, want) -> dict:
    """torchfast's (loss, grads) against eager's: relative differences; raises when the loss is off."""
    loss = abs(got[0].item() - want[0].item()) / max(abs(want[0].item()), 1e-30)
    if loss > LOSS_RTOL[dtype_name]:
        raise AssertionError(f"{case}: torchfast loss {got[0].item()} vs eager {want[0].item()} "
                             f"(relative {loss:.2e} > {LOSS_RTOL[dtype_name]:.0e})")
    return {"loss_rel_diff": loss, "grad_rel_diff": [_rel_diff(a, b) for a, b in zip(got[1], want[1])]}


# -- cross_entropy: harness cases ---------------------------------------------------------------------

def ce_case(n: int, v: int, dtype_name: str) -> H.Case:
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    params = {"op": "cross_entropy", "dtype": dtype_name, "tokens": n, "vocab": v, "shape": f"{n}x{v}"}

    def setup():
        args, leaves = ce_inputs(n, v, dtype)
        fns = loss_fns("ce")
        params["check"] = _check(f"cross_entropy {dtype_name} {n}x{v}", dtype_name,
                                 step(fns["torchfast"], args, leaves)(), step(fns["eager"], args, leaves)())
        return {k: H.Variant(fn=step(f, args, leaves), forward=lambda f=f: f(*args)) for k, f in fns.items()}

    # at least: the forward reads the logits, backward reads them again and writes their gradient
    return H.Case(f"cross_entropy fwd+bwd {dtype_name} {n}x{v}", params, setup, bytes_moved=3 * n * v * elt)


# -- linear_cross_entropy: one call per sample --------------------------------------------------------

def linear_case(n: int, h: int, v: int, dtype_name: str, repeats: int, clock: str,
                chunk_size: int | None = None) -> H.CaseResult:
    args, leaves = linear_inputs(n, h, v, DTYPES[dtype_name])
    fns = {k: step(f, args, leaves) for k, f in loss_fns("linear", chunk_size).items()}
    name = f"linear_cross_entropy fwd+bwd {dtype_name} {n}x{h}x{v}"
    params = {"op": "linear_cross_entropy", "dtype": dtype_name, "tokens": n, "hidden": h, "vocab": v,
              "shape": f"{n}x{h}x{v}", "chunk_size": chunk_size or "default"}
    t0 = time.perf_counter()
    fns["compiled"]()  # compiles (the result is dropped at once)
    params["compiled_warmup_s"] = time.perf_counter() - t0
    now = H.CLOCKS[clock]
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    losses: dict[str, float] = {}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for k in names[shift:] + names[:shift]:
                t0 = now()
                loss, _ = fns[k]()
                samples[k].append((now() - t0) * 1e3)
                losses[k] = loss.item()
                del loss, _
    finally:
        gc.enable()
    rel = abs(losses["torchfast"] - losses["eager"]) / max(abs(losses["eager"]), 1e-30)
    if rel > LOSS_RTOL[dtype_name]:
        raise AssertionError(f"{name}: torchfast loss {losses['torchfast']} vs eager {losses['eager']}")
    params["check"] = {"loss_rel_diff": rel, "losses": losses}
    variants = {k: H.VariantResult(k, H.Stats.of(s), s, 1) for k, s in samples.items()}
    return H.CaseResult(name, params, None, variants)


# -- peak memory: one variant per subprocess ----------------------------------------------------------

def _rss_kb() -> int:
    return H.status_kb("VmRSS")


def _vm_hwm_kb() -> int:
    return H.status_kb("VmHWM")


def memory_child(spec: dict) -> dict:
    """Run in a fresh process: inputs, then one step; peak-RSS growth in bytes (the counters are in KB)."""
    H.set_threads(spec["threads"])
    args, leaves = linear_inputs(spec["tokens"], spec["hidden"], spec["vocab"], DTYPES[spec["dtype"]])
    run = step(loss_fns("linear", spec.get("chunk_size"))[spec["variant"]], args, leaves)
    gc.collect()
    # ru_maxrss of a child also holds the RSS of the process it was forked from (Linux records the old
    # memory's peak at exec: 2.3 GB from the benchmark parent here, against 0.7 GB of inputs), which hid
    # every step's growth. VmHWM is the same peak for this process's own memory alone, and
    # /proc/self/clear_refs resets it once the inputs exist; ru_maxrss where /proc is missing.
    peak = _vm_hwm_kb if _vm_hwm_kb() > 0 else lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"inputs_rss_kb": _rss_kb(), "startup_maxrss_kb": peak(), "peak_reset": H.reset_peak()}
    out["base_maxrss_kb"] = peak()
    t0 = time.perf_counter()
    run()  # the result, gradients included, is dropped at once
    out["first_step_s"] = time.perf_counter() - t0
    out["first_growth_bytes"] = (peak() - out["base_maxrss_kb"]) * 1024
    out["growth_bytes"] = out["first_growth_bytes"]
    # The figure compared is a second step's, from a reset peak, for every variant: a training run is
    # many steps, and the first one also pages in library code (oneDNN/MKL kernels, thread pools) and,
    # for the compiled variant, compiles. Both steps are recorded.
    gc.collect()
    if H.reset_peak():
        base = peak()
        run()
        out["growth_bytes"] = (peak() - base) * 1024
        out["second_step_after_peak_reset"] = True
    return out


def memory_case(n: int, h: int, v: int, dtype_name: str, threads: int, chunk_size: int | None = None) -> dict:
    res = {"op": "linear_cross_entropy", "dtype": dtype_name, "shape": f"{n}x{h}x{v}", "variants": {}}
    for variant in VARIANTS:
        spec = {"variant": variant, "dtype": dtype_name, "tokens": n, "hidden": h, "vocab": v, "threads": threads,
                "chunk_size": chunk_size}
        proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr[-3000:]}")
        res["variants"][variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    eager = res["variants"]["eager"]["growth_bytes"]
    res["ratio_vs_eager"] = {k: r["growth_bytes"] / eager if eager > 0 else None for k, r in res["variants"].items()}
    ratio = res["ratio_vs_eager"]["torchfast"]
    res["status"] = "n/a" if ratio is None else ("PASS" if ratio <= MEMORY_TARGET else "FAIL")
    return res


# -- reporting ----------------------------------------------------------------------------------------

def times_table(results: list[H.CaseResult]) -> str:
    rows = []
    for r in results:
        p = r.params
        targets = CE_TARGETS if p["op"] == "cross_entropy" else LINEAR_TARGETS
        row = [p["op"], p["dtype"], p["shape"]] + [H.fmt_ms(r.variants[k].ms) for k in VARIANTS]
        for b, need in targets.items():
            x = r.speedup("torchfast", b).median
            row.append(f"{x:.2f}x {'PASS' if x >= need else 'FAIL'} (>= {need:g})")
        rows.append(row)
    headers = ["op", "dtype", "shape"] + [f"{k} ms" for k in VARIANTS] + ["vs eager", "vs compiled"]
    return H.format_table(headers, rows, "fwd+bwd: median ms per call ± half the IQR; 'vs X' = speedup of "
                          "torchfast over X (median of paired ratios; > 1: torchfast is faster)")


def saved_table(results: list[H.CaseResult]) -> str:
    rows = []
    for r in results:
        if r.params["op"] != "cross_entropy":
            continue
        p = r.params
        x_bytes = p["tokens"] * p["vocab"] * torch.empty((), dtype=DTYPES[p["dtype"]]).element_size()
        for k in VARIANTS:
            s = r.variants[k].saved
            if s is not None:
                rows.append([p["dtype"], p["shape"], k, H.fmt_bytes(s.bytes), f"{s.bytes / x_bytes:.2f}"])
    return H.format_table(["dtype", "shape", "variant", "saved", "× logits bytes"], rows,
                          "cross_entropy: saved for backward (saved_tensors_hooks, distinct tensors)")


def memory_table(mem: list[dict]) -> str:
    rows = []
    for m in mem:
        g = {k: m["variants"][k]["growth_bytes"] for k in VARIANTS}
        ratio = m["ratio_vs_eager"]
        rows.append([m["dtype"], m["shape"]] + [H.fmt_bytes(g[k]) for k in VARIANTS]
                    + [H.fmt_ratio(ratio["torchfast"]), H.fmt_ratio(ratio["compiled"]), first_ratio(m),
                       f"{m['status']} (<= {MEMORY_TARGET:g})"])
    headers = ["dtype", "shape"] + [f"{k} growth" for k in VARIANTS] + ["torchfast/eager", "compiled/eager",
                                                                        "1st step tf/eager", "target"]
    return H.format_table(headers, rows, "linear_cross_entropy fwd+bwd: growth of peak RSS (VmHWM) over a "
                          "second step (peak reset after the first), each variant in a fresh process")


def first_ratio(m: dict) -> str:
    """torchfast/eager over the first step (library code paged in, thread pools started): for reference."""
    tf, eager = (m["variants"][k].get("first_growth_bytes", 0) for k in ("torchfast", "eager"))
    return H.fmt_ratio(tf / eager) if eager > 0 else "n/a"


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark torchfast.cross_entropy / linear_cross_entropy on CPU "
                                "(see the script's docstring)")
    p.add_argument("--part", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                   help="default: float32 bfloat16 (float32 with --quick)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="cross_entropy: interleaved samples (default 9)")
    p.add_argument("--linear-repeats", type=int, default=None,
                   help="linear_cross_entropy: interleaved one-call samples (default 3)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="linear_cross_entropy's chunk_size for the torchfast variant (default: its default)")
    p.add_argument("--warmup", type=int, default=3, help="cross_entropy: untimed calls per variant")
    p.add_argument("--min-block-ms", type=float, default=20.0, help="cross_entropy: minimum sample duration")
    p.add_argument("--clock", default="wall", choices=list(H.CLOCKS),
                   help="wall (default) or process CPU time (robust on a shared machine at --threads 1)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['tokens']} tokens, hidden {QUICK['hidden']}, vocab {QUICK['vocabs'][0]}")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/...)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocabs = QUICK["tokens"], QUICK["hidden"], QUICK["vocabs"]
        args.repeats, args.linear_repeats = args.repeats or 3, args.linear_repeats or 2
        args.warmup, args.min_block_ms = 1, min(args.min_block_ms, 1.0)
    args.dtypes = args.dtypes or (["float32"] if args.quick else list(DTYPES))
    args.repeats = args.repeats or 9
    args.linear_repeats = args.linear_repeats or 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    env = H.environment("cpu")
    info = env["torchfast"] if isinstance(env["torchfast"], dict) else {}
    print(f"bench_cross_entropy: cpu ({env['device_name']}), torch {torch.__version__}, threads {threads}, "
          f"torchfast CPU ISA {info.get('cpu_isa_active')}, ATen {env['aten_cpu_capability']}, "
          f"load average {env['load_average_1min']}, clock {args.clock}")
    print(f"  N={args.tokens} tokens, H={args.hidden}, V={args.vocabs}, dtypes {args.dtypes}; cross_entropy "
          f"{args.repeats} interleaved repeats, linear {args.linear_repeats} (one call per sample)")
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    path = Path(args.json) if args.json else RESULTS_DIR / (
        f"bench_cross_entropy_cpu_{threads}t{'_quick' if args.quick else ''}.json")
    payload = {"benchmark": "cross_entropy", "environment": env,
               "config": {k: getattr(args, k) for k in ("part", "dtypes", "tokens", "hidden", "vocabs", "repeats",
                                                          "linear_repeats", "warmup", "min_block_ms", "clock", "quick")}
               | {"threads": threads},
               "cases": [], "memory": [], "load_average_1min": []}
    t_start = time.perf_counter()
    results: list[H.CaseResult] = []

    def record(what):  # after every case: a long run that is stopped keeps what it measured
        payload["load_average_1min"].append({"after": what, "load": H.load_average()})
        payload["cases"] = [dict(r.as_dict(), speedup={b: r.speedup("torchfast", b).as_dict()
                                                       for b in ("eager", "compiled")}) for r in results]
        payload["elapsed_s"] = time.perf_counter() - t_start
        H.write_json(path, payload)

    if "ce" in args.part:
        config = H.Config(repeats=args.repeats, warmup=args.warmup, min_block_s=args.min_block_ms / 1e3,
                          clock=args.clock)
        for v in args.vocabs:
            for d in args.dtypes:
                case = ce_case(args.tokens, v, d)
                progress(f"{case.name} (load {H.load_average()})")
                results.append(H.run_case(case, config))
                record(case.name)
    for v in args.vocabs:  # linear timing and memory per vocabulary: the small one finishes first
        for d in args.dtypes:
            if "linear" in args.part:
                progress(f"linear_cross_entropy fwd+bwd {d} {args.tokens}x{args.hidden}x{v} (load {H.load_average()})")
                results.append(linear_case(args.tokens, args.hidden, v, d, args.linear_repeats, args.clock,
                                           args.chunk_size))
                record(results[-1].name)
            if "memory" in args.part:
                progress(f"peak memory {d} {args.tokens}x{args.hidden}x{v} (load {H.load_average()})")
                payload["memory"].append(memory_case(args.tokens, args.hidden, v, d, threads, args.chunk_size))
                record(f"memory {d} {v}")
    print()
    if results:
        print(times_table(results))
    if "ce" in args.part:
        print()
        print(saved_table(results))
    if payload["memory"]:
        print()
        print(memory_table(payload["memory"]))
    loads = [x["load"] for x in payload["load_average_1min"] if x["load"] is not None]
    print(f"\nload average during the run: {min(loads, default=0):.2f}..{max(loads, default=0):.2f}")
    print(f"wrote {path} ({payload['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
