#!/usr/bin/env python
"""Benchmark torchfast.layer_norm on CPU against torch's LayerNorm, eager and compiled.

Variants (bf16 activations take the fp32 weight and bias as they are in every variant):
  torchfast  torchfast.layer_norm(x, w, b): statistics in one sweep of the row, torchfast::layer_norm_backward
  F          torch.nn.functional.layer_norm(x, (n,), w, b, eps): ATen's fused CPU kernel
  compiled   torch.compile(F.layer_norm call, dynamic=False)

Target of issue 4 (forward+backward, median over the shapes): at least as fast as F.layer_norm and as
compiled, in float32 and bfloat16.

    python benchmarks/bench_layer_norm.py
    python benchmarks/bench_layer_norm.py --threads 1 --clock process   # noise-robust on a shared machine
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
from torchfast.ops.layer_norm import layer_norm_reference  # noqa: E402

EPS = 1e-5


def _inputs(rows, n, dtype, grad, gen):
    return {
        "x": (torch.randn(rows, n, dtype=dtype, generator=gen) * 2 + 1).requires_grad_(grad),
        "w": (torch.rand(n, generator=gen) + 0.5).requires_grad_(grad),
        "b": torch.randn(n, generator=gen).requires_grad_(grad),
    }


def bench() -> NB.NormBench:
    compiled = NB.compiled(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS))
    return NB.NormBench(
        name="layer_norm",
        inputs=_inputs,
        variants={
            "torchfast": lambda t: torchfast.layer_norm(t["x"], t["w"], t["b"], eps=EPS),
            "F": lambda t: F.layer_norm(t["x"], (t["x"].shape[-1],), t["w"], t["b"], EPS),
            "compiled": lambda t: compiled(t["x"], t["w"], t["b"]),
        },
        reference=lambda t: layer_norm_reference(t["x"], t["w"], t["b"], eps=EPS),
        elements_moved=lambda mode: 2 if mode == "fwd" else 5,
        targets={(b, d): 1.0 for b in ("F", "compiled") for d in ("float32", "bfloat16")},
        labels={"torchfast": "torchfast.layer_norm(x, w, b)", "F": "F.layer_norm(x, (n,), w, b, eps)",
                "compiled": "torch.compile(F.layer_norm(...), dynamic=False)"},
        target_note="issue 4: at least as fast as F.layer_norm and compiled",
    )


if __name__ == "__main__":
    sys.exit(NB.main(bench()))
