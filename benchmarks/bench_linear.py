#!/usr/bin/env python
"""Benchmark torchfast.ops.linear (F.linear with float32 CPU GEMMs through oneDNN) against
F.linear (torch's BLAS: MKL in the x86 wheels), forward and forward+backward (input, weight and bias
gradients), at the shapes of transformer layers (tokens x in x out) and one few-token (decode) shape.

Variants:
  torchfast  torchfast.ops.linear with TORCHFAST_CPU_MATMUL forced to "onednn" for the run (whatever
             this CPU's "auto" would pick: the point is to measure both libraries here)
  blas       torch.nn.functional.linear, what nn.Linear runs

The summary is the median over shapes of the speedup, per mode; `cpu_matmul_backend()` "auto" picks
oneDNN only on the CPUs where this benchmark showed it faster (AMD); rerun it on another CPU before
changing that rule.

    python benchmarks/bench_linear.py --threads 1 --clock process
    python benchmarks/bench_linear.py --quick
"""

from __future__ import annotations

import os

os.environ["TORCHFAST_CPU_MATMUL"] = "onednn"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _report as R  # noqa: E402
import harness as H  # noqa: E402
from torchfast.ops import linear as L  # noqa: E402
from torchfast.testing import assert_close  # noqa: E402

DEFAULT_SHAPES = ["512x1024x1024", "2048x1024x4096", "2048x4096x1024", "8192x1024x1024", "64x4096x4096"]
NAMES = ["torchfast", "blas"]


def case(mode: str, shape: tuple) -> H.Case:
    tokens, d_in, d_out = shape

    def setup():
        gen = torch.Generator().manual_seed(tokens + d_in + d_out)
        x = torch.randn(tokens, d_in, generator=gen)
        w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, generator=gen)
        assert_close(L.linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4, what=f"linear {shape}")
        fns = {"torchfast": L.linear, "blas": F.linear}
        if mode == "fwd":
            return {n: (lambda f=f: f(x, w, b)) for n, f in fns.items()}
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        grad = torch.randn(tokens, d_out, generator=gen)
        return {
            n: H.Variant(fn=lambda f=f: torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), grad),
                         forward=lambda f=f: f(xg, wg, bg))
            for n, f in fns.items()
        }

    params = {"op": "linear", "mode": mode, "dtype": "float32", "shape": R.shape_label(shape)}
    return H.Case(f"linear {mode} {R.shape_label(shape)}", params, setup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_args(p, DEFAULT_SHAPES)
    args = R.finish_args(p, p.parse_args(argv), DEFAULT_SHAPES, "256x256x256")
    if args.device != "cpu":
        p.error("--device: torchfast.ops.linear only changes CPU GEMMs")
    args.dtypes = ["float32"]  # bfloat16 / float16 GEMMs already run on oneDNN in torch
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    env = H.environment(args.device)
    if L.cpu_matmul_backend() != "onednn":
        print("bench_linear: torch has no oneDNN GEMM for this CPU; nothing to compare", file=sys.stderr)
        return 1
    print(R.header("bench_linear", args, threads, env, H.copy_bandwidth(16 << 20)))
    print(f"  CPU vendor {L._cpu_vendor() or '?'}; 'auto' would pick {L._resolve('auto')}")
    cases = [case(m, s) for m in args.modes for s in args.shapes]
    config = R.config(args)
    config.copy_ceiling = False
    results = H.run_cases(cases, config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print()
    print(R.times_table(results, NAMES, ["blas"]))
    for mode in args.modes:
        print()
        print(R.summary_text(R.summary(results, {"blas": 1.0}, ["float32"], mode=mode), f"linear {mode}"))
    if args.json:
        H.write_json(args.json, {"benchmark": "linear", "environment": env,
                                 "results": [r.as_dict() for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
