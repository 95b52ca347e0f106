"""Benchmark of torchfast.swiglu / torchfast.geglu against the eager composite a user writes
(`F.silu(gate) * up`, `F.gelu(gate, approximate=...) * up`) and torch.compile of that composite; there
is no ATen op for a gated unit. Forward and forward+backward, float32 and bfloat16, on the
[tokens, intermediate] shapes of LLM MLPs. Also times the packed form torchfast.swiglu(x) (x of width 2H)
for information. At the end, the issue's targets: fwd+bwd, median over shapes, >= 2x vs eager and
>= 1.2x vs compiled, per op and dtype; and the saved-activation bytes (target: <= the two inputs).

    python benchmarks/bench_glu.py                        # CPU, all ops, fwd and fwd+bwd, fp32 + bf16
    python benchmarks/bench_glu.py --ops swiglu --modes fwd+bwd --shapes 2048x4096
    python benchmarks/bench_glu.py --quick                # smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile workers would compete for the cores

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report as R
import harness as H
import torch
import torch.nn.functional as F

import torchfast
from torchfast.testing import assert_close

DEFAULT_SHAPES = ["512x1024", "2048x4096", "8192x1024", "4096x8192"]
OPS = {  # name: (torchfast function, eager composite)
    "swiglu": (lambda g, u=None: torchfast.swiglu(g, u), lambda g, u: F.silu(g) * u),
    "geglu": (lambda g, u=None: torchfast.geglu(g, u), lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (
        lambda g, u=None: torchfast.geglu(g, u, approximate="tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u,
    ),
}
NAMES = ["torchfast", "packed", "eager", "compiled"]
TARGETS = {"eager": 2.0, "compiled": 1.2}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_case(op: str, mode: str, dtype_name: str, shape: tuple, device: str) -> H.Case:
    dtype = R.DTYPES[dtype_name]
    fast, composite = OPS[op]
    comp = R.compiled(composite)
    numel = shape[0] * shape[1]
    esize = torch.empty((), dtype=dtype).element_size()
    # fwd reads gate and up and writes y (3n); the backward reads grad_out, gate, up, writes two grads (5n)
    moved = (3 if mode == "fwd" else 8) * numel * esize

    def setup():
        gen = torch.Generator(device=device).manual_seed(numel)
        x = torch.randn(shape[0], 2 * shape[1], device=device, dtype=dtype, generator=gen) * 2
        gate, up = (t.contiguous() for t in x.chunk(2, dim=-1))
        ref = composite(gate.double(), up.double())
        assert_close(fast(gate, up), ref, dtype=dtype, what=f"bench_glu {op} {dtype_name} {shape}")
        assert_close(fast(x), ref, dtype=dtype, what=f"bench_glu {op} packed {dtype_name} {shape}")
        fns = {"torchfast": lambda g, u: fast(g, u), "eager": composite, "compiled": comp}
        if mode == "fwd":
            out = {n: (lambda f=f: f(gate, up)) for n, f in fns.items()}
            out["packed"] = lambda: fast(x)
            return {n: out[n] for n in NAMES}
        g_, u_ = gate.clone().requires_grad_(), up.clone().requires_grad_()
        xg = x.clone().requires_grad_()
        grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        out = {
            n: H.Variant(
                fn=lambda f=f: torch.autograd.grad(f(g_, u_), (g_, u_), grad), forward=lambda f=f: f(g_, u_)
            )
            for n, f in fns.items()
        }
        out["packed"] = H.Variant(
            fn=lambda: torch.autograd.grad(fast(xg), xg, grad), forward=lambda: fast(xg)
        )
        return {n: out[n] for n in NAMES}

    params = {
        "op": op,
        "mode": mode,
        "dtype": dtype_name,
        "shape": R.shape_label(shape),
        "numel": numel,
        "esize": esize,
    }
    return H.Case(f"{op} {mode} {dtype_name} {R.shape_label(shape)}", params, setup, bytes_moved=moved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_args(p, DEFAULT_SHAPES)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    args = R.finish_args(p, p.parse_args(argv), DEFAULT_SHAPES, "64x256")
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    env = H.environment(args.device)
    ceiling = H.copy_bandwidth(16 << 20 if args.quick else 256 << 20, args.device)
    print(R.header("bench_glu", args, threads, env, ceiling))
    cases = [
        make_case(o, m, d, s, args.device)
        for o in args.ops
        for m in args.modes
        for d in args.dtypes
        for s in args.shapes
    ]
    t0 = time.perf_counter()
    results = H.run_cases(cases, R.config(args), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    print()
    print(R.times_table(results, NAMES, ["eager", "compiled"]))
    print()
    print(R.bandwidth_table(results, NAMES, "fwd: read gate, up, write y = 3n; fwd+bwd: 8n"))
    if "fwd+bwd" in args.modes:
        print()
        print(R.saved_table(results, NAMES, lambda p: 2 * p["numel"] * p["esize"], "gate+up bytes"))
    s = R.summary(results, TARGETS, args.dtypes)
    print()
    print(R.summary_text(s, "Targets (issue 3)"))
    payload = {
        "benchmark": "glu",
        "environment": env,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "copy_bandwidth_gbps": ceiling,
        "cases": [r.as_dict() for r in results],
        "summary": s,
        "elapsed_s": elapsed,
    }
    path = (
        args.json or RESULTS_DIR / f"bench_glu_{args.device}_{threads}t{'_quick' if args.quick else ''}.json"
    )
    print(f"\nwrote {H.write_json(path, payload)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
