"""Benchmark of torchfast's normalizations on CPU (rms_norm, add_rms_norm, layer_norm) against what a
user would run otherwise, in one process so that every ratio comes from one run:

    rms_norm      torchfast.rms_norm | eager composite | F.rms_norm | torch.compile(F.rms_norm)
    add_rms_norm  torchfast.add_rms_norm | torchfast add, then torchfast.rms_norm
    layer_norm    torchfast.layer_norm | F.layer_norm | torch.compile(F.layer_norm)

for forward (no grad) and forward+backward (grad of x and weight), float32 and bfloat16 activations
with an fp32 weight (the AMP case; F.rms_norm and F.layer_norm accept that mix too), over rows x hidden
of real models. The eager composite is the common Python RMSNorm,
`x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w`, with w in x's dtype.

Timing: every variant runs one block of calls (at least 20 ms) per repeat, in an order rotated each
repeat, so machine noise hits all alike; a speedup is the median over repeats of the paired ratio (baseline time / torchfast time of
the same repeat). Outputs are allocated by every call, as users get them (page faults included).
torch.compile runs in this process at the thread count set here (compile and thread counts do not mix
well: run one thread count per process). Saved bytes: what autograd keeps for backward, counted with
saved_tensors_hooks (parameters excluded: they are kept anyway).

    python benchmarks/bench_norm.py                      # default shapes, all ops
    python benchmarks/bench_norm.py --ops rms_norm --shapes 4096x2048 --repeats 15

This is the minimal stand-alone form; it moves onto benchmarks/harness.py once that is on main.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchfast  # noqa: E402

EPS = 1e-6
DEFAULT_SHAPES = ["512x4096", "2048x2048", "4096x2048", "8192x1024", "1024x8192"]


def composite_rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _forwards(op: str, rows: int, n: int, dtype: torch.dtype, backward: bool):
    """(name -> zero-argument forward, the gradient to send back, the parameters)."""
    x = torch.randn(rows, n, dtype=dtype, requires_grad=backward)
    r = torch.randn(rows, n, dtype=dtype, requires_grad=backward)
    w = (torch.rand(n) + 0.5).requires_grad_(backward)
    b = torch.randn(n).requires_grad_(backward)
    w_low = w.detach().to(dtype).requires_grad_(backward)
    g = torch.randn(rows, n, dtype=dtype)

    if op == "rms_norm":
        fns = {
            "torchfast": lambda: torchfast.rms_norm(x, w, eps=EPS),
            "eager composite": lambda: composite_rms_norm(x, w_low),
            "F.rms_norm": lambda: F.rms_norm(x, (n,), w, EPS),
            "compiled F.rms_norm": _compiled(lambda x, w: F.rms_norm(x, (n,), w, EPS), x, w),
        }
    elif op == "add_rms_norm":
        fns = {
            "torchfast": lambda: torchfast.add_rms_norm(x, r, w, eps=EPS),
            "torchfast add + rms_norm": lambda: _add_then_norm(x, r, w),
        }
    elif op == "layer_norm":
        fns = {
            "torchfast": lambda: torchfast.layer_norm(x, w, b, eps=1e-5),
            "F.layer_norm": lambda: F.layer_norm(x, (n,), w, b, 1e-5),
            "compiled F.layer_norm": _compiled(lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5), x, w, b),
        }
    else:
        raise ValueError(f"unknown op {op!r}")
    return fns, g, (w, b, w_low)


def _variants(op: str, rows: int, n: int, dtype: torch.dtype, backward: bool) -> dict:
    """name -> zero-argument callable running one forward (and backward) with fresh outputs."""
    fns, g, _ = _forwards(op, rows, n, dtype, backward)
    if not backward:
        return {k: _no_grad(f) for k, f in fns.items()}
    return {k: _with_backward(f, g) for k, f in fns.items()}


def _add_then_norm(x, r, w):
    h = x + r
    return torchfast.rms_norm(h, w, eps=EPS), h


def _compiled(fn, *args):
    compiled = torch.compile(fn, fullgraph=True)
    return lambda: compiled(*args)


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()

    return run


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _with_backward(fn, g):
    def run():
        outs = _outputs(fn())
        torch.autograd.backward(outs, [g] * len(outs))

    return run


def saved_bytes(op: str, rows: int, n: int, dtype: torch.dtype) -> dict:
    """Bytes autograd keeps for backward per variant, parameters (and their dtype casts) excluded."""
    fns, _, params = _forwards(op, rows, n, dtype, backward=True)
    out = {}
    for name, fn in fns.items():
        total = [0]

        def pack(t):
            if not any(t is p for p in params) and t.shape != (n,):
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        out[name] = total[0]
    return out


def time_variants(fns: dict, repeats: int, min_sample_s: float = 0.02) -> dict:
    """Per variant: median and min time per call, and the median over repeats of the paired ratio
    (variant / torchfast). A sample times a block of calls lasting at least min_sample_s, so that the
    scheduler's ticks on a shared machine do not dominate small shapes."""
    names = list(fns)
    calls = {}
    for k, f in fns.items():  # warm up (compiles), settle the allocator, size the blocks
        f()
        t0 = time.perf_counter()
        f()
        calls[k] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-6)))
    samples = {k: [] for k in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fns[k]()
            samples[k].append((time.perf_counter() - t0) / calls[k])
    base = samples["torchfast"]
    return {
        k: {
            "median_ms": statistics.median(v) * 1e3,
            "min_ms": min(v) * 1e3,
            "speedup_of_torchfast": statistics.median([b / a for a, b in zip(base, v)]),
        }
        for k, v in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=["rms_norm", "add_rms_norm", "layer_norm"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="ROWSxHIDDEN")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "norm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = []
    print(f"torch {torch.__version__}, {args.threads} threads, CPU ISA {torchfast.build_info()['cpu_isa_active']}, "
          f"{platform.processor() or platform.machine()}; median of {args.repeats} paired repeats")
    print(f"{'op':<13}{'dtype':<10}{'mode':<9}{'rows x n':<11}{'baseline':<26}{'ms':>9}{'tf ms':>9}{'speedup':>9}"
          f"{'saved MB':>10}")
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for shape in args.shapes:
                rows, n = (int(s) for s in shape.split("x"))
                saved = saved_bytes(op, rows, n, dtype)
                for mode in args.modes:
                    timing = time_variants(_variants(op, rows, n, dtype, mode == "fwd+bwd"), args.repeats)
                    tf = timing["torchfast"]
                    for name, t in timing.items():
                        if name == "torchfast":
                            continue
                        mb = saved[name] / 2**20 if mode == "fwd+bwd" else float("nan")
                        print(f"{op:<13}{dtype_name:<10}{mode:<9}{shape:<11}{name:<26}{t['median_ms']:>9.2f}"
                              f"{tf['median_ms']:>9.2f}{t['speedup_of_torchfast']:>8.2f}x{mb:>10.1f}")
                        results.append(dict(op=op, dtype=dtype_name, mode=mode, rows=rows, n=n, baseline=name,
                                            baseline_ms=t["median_ms"], torchfast_ms=tf["median_ms"],
                                            speedup=t["speedup_of_torchfast"],
                                            saved_bytes=saved[name], torchfast_saved_bytes=saved["torchfast"]))
                    print(f"{'':<43}{'(torchfast saves':<26}{saved['torchfast'] / 2**20:>8.1f} MB)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                          "repeats": args.repeats, "results": results}, indent=1))
    _summary(results)


def _summary(results: list) -> None:
    """Median speedup per (op, dtype, mode, baseline) over the shapes: the numbers the issue targets."""
    print("\nmedian speedup of torchfast over the shapes:")
    keys = sorted({(r["op"], r["dtype"], r["mode"], r["baseline"]) for r in results})
    for key in keys:
        vals = [r["speedup"] for r in results if (r["op"], r["dtype"], r["mode"], r["baseline"]) == key]
        print(f"  {' '.join(key[:3]):<32} vs {key[3]:<26} {statistics.median(vals):6.2f}x  "
              f"(min {min(vals):.2f}x, max {max(vals):.2f}x, {len(vals)} shapes)")


if __name__ == "__main__":
    main()
