"""Benchmark of torchfast.bias_act (y = act(x + b)) against the eager composite a user writes
(`act(x + b)` with F.relu / F.gelu / F.silu) and torch.compile of it, and of
torchfast.nn.Linear(activation=...) against nn.Linear followed by the activation module (eager and
compiled). Forward and forward+backward, float32 and bfloat16, shapes of real models. ATen has no fused
bias+activation op (nn.Linear fuses the bias into the matmul through addmm, which the Linear part
measures). At the end, the issue's targets: fwd+bwd, median over shapes, bias_act >= 1.5x vs eager and
Linear(activation) >= 1.2x vs nn.Linear + activation module, per activation and dtype.

    python benchmarks/bench_bias_act.py                       # both parts, fp32 + bf16
    python benchmarks/bench_bias_act.py --part op --acts gelu --shapes 4096x4096
    python benchmarks/bench_bias_act.py --part linear --linear-shapes 2048x1024x4096
    python benchmarks/bench_bias_act.py --quick               # smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile workers would compete for the cores

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report as R
import harness as H
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.testing import assert_close

DEFAULT_SHAPES = ["512x1024", "2048x4096", "8192x1024", "4096x8192"]
# tokens x in_features x out_features: matmuls of real MLP layers, small enough to time on a laptop CPU
DEFAULT_LINEAR_SHAPES = ["512x1024x4096", "2048x1024x4096", "2048x4096x1024", "8192x1024x1024"]
ACTS = {
    "relu": (F.relu, nn.ReLU),
    "gelu": (F.gelu, nn.GELU),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), lambda: nn.GELU(approximate="tanh")),
    "swish": (F.silu, nn.SiLU),
}
COMPOSITES = {a: (lambda x, b, f=f: f(x + b)) for a, (f, _) in ACTS.items()}
NAMES = ["torchfast", "eager", "compiled"]
TARGETS = {"op": {"eager": 1.5}, "linear": {"eager": 1.2}}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def op_case(act: str, mode: str, dtype_name: str, shape: tuple, device: str) -> H.Case:
    dtype = R.DTYPES[dtype_name]
    composite = COMPOSITES[act]
    comp = R.compiled(composite)
    numel = shape[0] * shape[1]
    esize = torch.empty((), dtype=dtype).element_size()
    moved = (2 if mode == "fwd" else 5) * numel * esize  # fwd: read x, write y; bwd: read dy, x, write dx

    def setup():
        gen = torch.Generator(device=device).manual_seed(numel)
        x = torch.randn(shape, device=device, dtype=dtype, generator=gen) * 2
        b = torch.randn(shape[1], device=device, dtype=dtype, generator=gen)
        fast = lambda x, b: torchfast.bias_act(x, b, act=act)
        assert_close(
            fast(x, b), composite(x.double(), b.double()), dtype=dtype, what=f"bias_act {act} {shape}"
        )
        fns = {"torchfast": fast, "eager": composite, "compiled": comp}
        if mode == "fwd":
            return {n: (lambda f=f: f(x, b)) for n, f in fns.items()}
        xg, bg = x.clone().requires_grad_(), b.clone().requires_grad_()
        grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        return {
            n: H.Variant(
                fn=lambda f=f: torch.autograd.grad(f(xg, bg), (xg, bg), grad), forward=lambda f=f: f(xg, bg)
            )
            for n, f in fns.items()
        }

    params = {
        "op": f"bias_act[{act}]",
        "part": "op",
        "mode": mode,
        "dtype": dtype_name,
        "shape": R.shape_label(shape),
        "numel": numel,
        "esize": esize,
    }
    return H.Case(
        f"bias_act {act} {mode} {dtype_name} {R.shape_label(shape)}", params, setup, bytes_moved=moved
    )


def linear_case(act: str, mode: str, dtype_name: str, shape: tuple, device: str) -> H.Case:
    dtype = R.DTYPES[dtype_name]
    tokens, d_in, d_out = shape
    esize = torch.empty((), dtype=dtype).element_size()

    def setup():
        torch.manual_seed(tokens + d_in + d_out)
        ours = torchfast.nn.Linear(d_in, d_out, activation=act, device=device, dtype=dtype)
        lin = nn.Linear(d_in, d_out, device=device, dtype=dtype)
        lin.load_state_dict(ours.state_dict())
        eager = nn.Sequential(lin, ACTS[act][1]())
        comp = torch.compile(copy.deepcopy(eager), dynamic=False)
        x = torch.randn(tokens, d_in, device=device, dtype=dtype)
        with torch.no_grad():  # same math, up to the order of the bias add: loose bf16 atol for big sums
            assert_close(
                ours(x),
                eager(x).double(),
                dtype=dtype,
                atol=0.05 if dtype == torch.bfloat16 else 1e-4,
                rtol=0.02 if dtype == torch.bfloat16 else 1e-4,
                what=f"Linear {act} {shape}",
            )
        mods = {"torchfast": ours, "eager": eager, "compiled": comp}
        if mode == "fwd":

            def fwd(m):
                with torch.no_grad():
                    return m(x)

            return {n: (lambda m=m: fwd(m)) for n, m in mods.items()}
        xg = x.clone().requires_grad_()
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        return {
            n: H.Variant(
                fn=lambda m=m: torch.autograd.grad(m(xg), [xg, *m.parameters()], grad),
                forward=lambda m=m: m(xg),
            )
            for n, m in mods.items()
        }

    params = {
        "op": f"Linear[{act}]",
        "part": "linear",
        "mode": mode,
        "dtype": dtype_name,
        "shape": R.shape_label(shape),
        "numel": tokens * d_out,
        "esize": esize,
    }
    # bytes: the elementwise part only (the matmul's traffic depends on the BLAS), for reference
    return H.Case(f"Linear {act} {mode} {dtype_name} {R.shape_label(shape)}", params, setup, bytes_moved=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_args(p, DEFAULT_SHAPES)
    p.add_argument("--part", nargs="+", default=["op", "linear"], choices=["op", "linear"])
    p.add_argument("--acts", nargs="+", default=list(ACTS), choices=list(ACTS))
    p.add_argument(
        "--linear-shapes",
        nargs="+",
        default=None,
        metavar="TxINxOUT",
        help=f"Linear shapes tokens x in x out (default: {' '.join(DEFAULT_LINEAR_SHAPES)})",
    )
    p.add_argument("--linear-modes", nargs="+", default=["fwd+bwd"], choices=list(R.MODES))
    args = R.finish_args(p, p.parse_args(argv), DEFAULT_SHAPES, "64x256")
    raw = args.linear_shapes or (["64x128x256"] if args.quick else DEFAULT_LINEAR_SHAPES)
    lin_shapes = [tuple(int(v) for v in s.lower().split("x")) for s in raw]
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    env = H.environment(args.device)
    ceiling = H.copy_bandwidth(16 << 20 if args.quick else 256 << 20, args.device)
    print(R.header("bench_bias_act", args, threads, env, ceiling))
    cases = []
    if "op" in args.part:
        cases += [
            op_case(a, m, d, s, args.device)
            for a in args.acts
            for m in args.modes
            for d in args.dtypes
            for s in args.shapes
        ]
    if "linear" in args.part:
        cases += [
            linear_case(a, m, d, s, args.device)
            for a in args.acts
            for m in args.linear_modes
            for d in args.dtypes
            for s in lin_shapes
        ]
    t0 = time.perf_counter()
    results = H.run_cases(cases, R.config(args), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    summaries = {}
    for part in args.part:
        rs = [r for r in results if r.params["part"] == part]
        print()
        print(R.times_table(rs, NAMES, ["eager", "compiled"]))
        if part == "op":
            print()
            print(R.bandwidth_table(rs, NAMES, "fwd: read x, write y = 2n; fwd+bwd: 5n"))
            if "fwd+bwd" in args.modes:
                print()
                print(R.saved_table(rs, NAMES, lambda p: p["numel"] * p["esize"], "x bytes"))
        summaries[part] = R.summary(rs, TARGETS[part], args.dtypes)
        print()
        print(R.summary_text(summaries[part], f"Target (issue 3, {part})"))
    payload = {
        "benchmark": "bias_act",
        "environment": env,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "linear_shapes": [list(s) for s in lin_shapes],
        "copy_bandwidth_gbps": ceiling,
        "cases": [r.as_dict() for r in results],
        "summary": summaries,
        "elapsed_s": elapsed,
    }
    path = (
        args.json
        or RESULTS_DIR / f"bench_bias_act_{args.device}_{threads}t{'_quick' if args.quick else ''}.json"
    )
    print(f"\nwrote {H.write_json(path, payload)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
