#!/usr/bin/env python
"""Benchmark torchfast.rms_norm and torchfast.add_rms_norm on CPU against what users run otherwise.

rms_norm variants. torchfast takes the fp32 weight as it is (the AMP layout); the baselines get the
weight in x's dtype, the layout they are fastest with (F.rms_norm falls back to its unfused path, with a
warning, when a bf16 x meets an fp32 weight):
  torchfast  torchfast.rms_norm(x, w): one pass per row forward, torchfast::rms_norm_backward
  eager      the common Python RMSNorm, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
  F          torch.nn.functional.rms_norm(x, (n,), w, eps)
  compiled   torch.compile(F.rms_norm call, dynamic=False)
add_rms_norm variants (--op add_rms_norm), h = x + r, y = rms_norm(h):
  torchfast  torchfast.add_rms_norm(x, r, w): one pass, returns (y, h)
  separate   h = x + r, then torchfast.rms_norm(h, w)
  compiled   torch.compile of h = x + r; F.rms_norm(h, (n,), w_x) (dynamic=False), weight in x's dtype

Targets of issue 4 (forward+backward, median over the shapes): rms_norm >= 4x faster than F.rms_norm
in float32 and >= 10x in bfloat16, and >= 1.2x faster than compiled; add_rms_norm faster than the
separate add + rms_norm.

    python benchmarks/bench_rms_norm.py                      # rms_norm, fp32 + bf16, 6 shapes
    python benchmarks/bench_rms_norm.py --op add_rms_norm
    python benchmarks/bench_rms_norm.py --threads 1 --clock process   # noise-robust on a shared machine
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # before torch: compile in-process

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import norm_bench as NB  # noqa: E402
import torchfast  # noqa: E402
from torchfast.ops.rms_norm import rms_norm_reference  # noqa: E402

EPS = 1e-6


def _inputs(rows, n, dtype, grad, gen, residual=False):
    x = torch.randn(rows, n, dtype=dtype, generator=gen).requires_grad_(grad)
    w = torch.rand(n, generator=gen) + 0.5
    # w: fp32 master weight (torchfast); w_x: the same values in x's dtype (the baselines)
    out = {"x": x, "w": w.requires_grad_(grad), "w_x": w.detach().to(dtype).requires_grad_(grad)}
    if residual:
        out["r"] = torch.randn(rows, n, dtype=dtype, generator=gen).requires_grad_(grad)
    return out


def _composite(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rms_norm_bench() -> NB.NormBench:
    compiled = NB.compiled(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS))
    return NB.NormBench(
        name="rms_norm",
        inputs=_inputs,
        variants={
            "torchfast": lambda t: torchfast.rms_norm(t["x"], t["w"], eps=EPS),
            "eager": lambda t: _composite(t["x"], t["w_x"]),
            "F": lambda t: F.rms_norm(t["x"], (t["x"].shape[-1],), t["w_x"], EPS),
            "compiled": lambda t: compiled(t["x"], t["w_x"]),
        },
        reference=lambda t: rms_norm_reference(t["x"], t["w"], eps=EPS),
        elements_moved=lambda mode: 2 if mode == "fwd" else 5,  # x, y; + grad_y, x, grad_x
        targets={("F", "float32"): 4.0, ("F", "bfloat16"): 10.0, ("compiled", "float32"): 1.2,
                 ("compiled", "bfloat16"): 1.2},
        labels={"torchfast": "torchfast.rms_norm(x, w)",
                "eager": "x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w",
                "F": "F.rms_norm(x, (n,), w, eps)", "compiled": "torch.compile(F.rms_norm(...), dynamic=False)"},
        target_note="issue 4: >= 4x / 10x vs F.rms_norm in float32 / bfloat16, >= 1.2x vs compiled",
    )


def _separate(x, r, w):
    h = x + r
    return torchfast.rms_norm(h, w, eps=EPS), h


def _add_rms_norm_bench() -> NB.NormBench:
    def unfused(x, r, w):
        h = x + r
        return F.rms_norm(h, (h.shape[-1],), w, EPS), h

    compiled = NB.compiled(unfused)
    return NB.NormBench(
        name="add_rms_norm",
        inputs=lambda *a: _inputs(*a, residual=True),
        variants={
            "torchfast": lambda t: torchfast.add_rms_norm(t["x"], t["r"], t["w"], eps=EPS),
            "separate": lambda t: _separate(t["x"], t["r"], t["w"]),
            "compiled": lambda t: compiled(t["x"], t["r"], t["w_x"]),
        },
        reference=lambda t: (rms_norm_reference(t["x"] + t["r"], t["w"], eps=EPS), t["x"] + t["r"]),
        # fwd: read x, r; write y, h. bwd: read grad_y, grad_h, h; write grad (shared by x and r).
        elements_moved=lambda mode: 4 if mode == "fwd" else 8,
        targets={("separate", "float32"): 1.0, ("separate", "bfloat16"): 1.0},
        labels={"torchfast": "torchfast.add_rms_norm(x, r, w) -> (y, h)",
                "separate": "h = x + r; torchfast.rms_norm(h, w)",
                "compiled": "torch.compile(h = x + r; F.rms_norm(h, ...), dynamic=False)"},
        target_note="issue 4: the fused op faster than torchfast's add + rms_norm separately",
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    op = "rms_norm"
    if "--op" in argv:
        i = argv.index("--op")
        op = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
    benches = {"rms_norm": _rms_norm_bench, "add_rms_norm": _add_rms_norm_bench}
    if op not in benches:
        print(f"bench_rms_norm: --op must be one of {', '.join(benches)}, got '{op}'", file=sys.stderr)
        return 2
    return NB.main(benches[op](), argv)


if __name__ == "__main__":
    sys.exit(main())
