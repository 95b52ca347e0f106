"""Benchmark of torchfast.rope against the eager composite a model runs (transformers'
`apply_rotary_pos_emb`: q * cos + rotate_half(q) * sin, and the same for k) and torch.compile of that
composite. Forward and forward+backward (gradients of q and k; cos/sin are a constant cache), float32 and
bfloat16 with cos/sin in q's dtype (what Llama passes), optionally float32 cos/sin with bf16 q
(--cos-fp32). Shapes are BxTxHqxHkxD ([B, H, T, D] heads, cos/sin [B, T, D]); the default is the issue's
2x2048x32x8x128. At the end, the targets of issue 13: fwd+bwd >= 3x eager and >= 1.2x compiled.

    python benchmarks/bench_rope.py                                  # CPU, fwd and fwd+bwd, fp32 + bf16
    python benchmarks/bench_rope.py --threads 1 --clock process --modes fwd+bwd
    python benchmarks/bench_rope.py --quick                          # smoke run
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

import torchfast
from torchfast.ops.rope import rope_cache
from torchfast.testing import assert_close

DEFAULT_SHAPES = ["2x2048x32x8x128"]
NAMES = ["torchfast", "eager", "compiled"]
TARGETS = {"eager": 3.0, "compiled": 1.2}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' function, as models call it."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def make_case(mode: str, dtype_name: str, shape: tuple, device: str, cos_fp32: bool) -> H.Case:
    dtype = R.DTYPES[dtype_name]
    b, t, hq, hk, d = shape
    cs_dtype = torch.float32 if cos_fp32 else dtype
    comp = R.compiled(apply_rotary_pos_emb)
    numel = b * t * (hq + hk) * d
    esize = torch.empty((), dtype=dtype).element_size()
    # fwd reads q, k and writes q_rot, k_rot (2n); bwd reads the two output grads, writes two input grads
    # (2n more). cos/sin ([B, T, D]) are small next to them and not counted.
    moved = (2 if mode == "fwd" else 4) * numel * esize

    def setup():
        gen = torch.Generator(device=device).manual_seed(numel)
        q = torch.randn(b, hq, t, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b, hk, t, d, device=device, dtype=dtype, generator=gen)
        cos, sin = rope_cache(torch.arange(t, device=device).expand(b, t), d, dtype=cs_dtype)
        fast = lambda q_, k_: torchfast.rope(q_, k_, cos, sin)  # noqa: E731
        eq, ek = apply_rotary_pos_emb(q[:, :2].double(), k[:, :2].double(), cos.double(), sin.double())
        fq, fk = fast(q[:, :2], k[:, :2])
        assert_close(fq, eq, dtype=dtype, what=f"bench_rope q {dtype_name} {shape}")
        assert_close(fk, ek, dtype=dtype, what=f"bench_rope k {dtype_name} {shape}")
        fns = {"torchfast": fast, "eager": lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin),
               "compiled": lambda q_, k_: comp(q_, k_, cos, sin)}
        if mode == "fwd":
            return {n: (lambda f=f: f(q, k)) for n, f in fns.items()}
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        return {
            n: H.Variant(fn=lambda f=f: torch.autograd.grad(f(qg, kg), (qg, kg), (gq, gk)),
                         forward=lambda f=f: f(qg, kg))
            for n, f in fns.items()
        }

    label = R.shape_label(shape) + (" cos fp32" if cos_fp32 and dtype != torch.float32 else "")
    params = {"op": "rope", "mode": mode, "dtype": dtype_name, "shape": label, "numel": numel, "esize": esize}
    return H.Case(f"rope {mode} {dtype_name} {label}", params, setup, bytes_moved=moved)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_args(p, DEFAULT_SHAPES)
    p.add_argument("--cos-fp32", action="store_true", help="float32 cos/sin with bf16/fp16 q and k")
    args = R.finish_args(p, p.parse_args(argv), DEFAULT_SHAPES, "1x64x4x2x64")
    if any(len(s) != 5 for s in args.shapes):
        p.error(f"--shapes are BxTxHqxHkxD, e.g. 2x2048x32x8x128; got {args.shapes}")
    sys.stdout.reconfigure(line_buffering=True)
    threads = H.set_threads(args.threads)
    env = H.environment(args.device)
    ceiling = H.copy_bandwidth(16 << 20 if args.quick else 256 << 20, args.device)
    print(R.header("bench_rope", args, threads, env, ceiling))
    cases = [make_case(m, d, s, args.device, args.cos_fp32) for m in args.modes for d in args.dtypes
             for s in args.shapes]
    t0 = time.perf_counter()
    results = H.run_cases(cases, R.config(args), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    print()
    print(R.times_table(results, NAMES, ["eager", "compiled"]))
    print()
    print(R.bandwidth_table(results, NAMES, "fwd: read q, k, write q_rot, k_rot = 2n; fwd+bwd: 4n"))
    if "fwd+bwd" in args.modes:
        print()
        print(R.saved_table(results, NAMES, lambda p: p["numel"] * p["esize"], "q+k bytes"))
    s = R.summary(results, TARGETS, args.dtypes)
    print()
    print(R.summary_text(s, "Targets (issue 13)"))
    payload = {
        "benchmark": "rope",
        "environment": env,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "copy_bandwidth_gbps": ceiling,
        "cases": [r.as_dict() for r in results],
        "summary": s,
        "elapsed_s": elapsed,
    }
    quick = "_quick" if args.quick else ""
    path = args.json or RESULTS_DIR / f"bench_rope_{args.device}_{threads}t{quick}.json"
    print(f"\nwrote {H.write_json(path, payload)} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
