"""Compression benchmark: size and latency of an MLP of torchfast layers after each compression.

    .venv/bin/python benchmarks/bench_compress.py [--dim 1024] [--hidden 2048] [--batch 128]
                                                  [--threads 1] [--clock process] [--repeats 9]

The model: torchfast.nn.Linear(dim, hidden, activation="swish") -> torchfast.nn.SwiGLU(hidden,
2*hidden) -> nn.Linear(hidden, dim), float32. Rows (each against the float32 model of the same
kind, both timed in one interleaved loop by torchfast.compress.compare, median of --repeats):

  int8 weight-only (torchao)   quantize(mode="int8_weight_only"), PyTorch eager
  int8 dynamic (torchao)       quantize(mode="int8_dynamic"), PyTorch eager
  ONNX dynamic int8            quantize_onnx(mode="dynamic") vs the float ONNX export, onnxruntime
  prune 50% + shrink           prune(0.5, method="ln_structured") then shrink, PyTorch eager

Targets (issue 6): int8 size <= 0.3x; shrink >= 1.6x faster; ONNX int8 faster than ONNX float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from torch import nn

import torchfast
import torchfast.compress as C
import torchfast.export


def build(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        torchfast.nn.Linear(dim, hidden, activation="swish"),
        torchfast.nn.SwiGLU(hidden, 2 * hidden),
        nn.Linear(hidden, dim),
    ).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "process"), default="process")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(args.dim, args.hidden)
    x = torch.randn(args.batch, args.dim)
    kw = {"repeats": args.repeats, "threads": args.threads, "clock": args.clock}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "mlp.onnx"), os.path.join(tmp, "mlp.int8.onnx")
        torchfast.export.onnx(model, (x[:8],), fp32, rtol=1e-4, atol=1e-4)
        C.quantize_onnx(fp32, int8, mode="dynamic", calibration_data=x)
        rows["int8 weight-only (torchao)"] = C.compare(model, C.quantize(model, mode="int8_weight_only"), x, **kw)
        rows["int8 dynamic (torchao)"] = C.compare(model, C.quantize(model, mode="int8_dynamic"), x, **kw)
        rows["ONNX dynamic int8 (onnxruntime)"] = C.compare(fp32, int8, x, **kw)
        small = C.shrink(C.prune(model, 0.5, method="ln_structured"))
        rows["prune 50% structured + shrink"] = C.compare(model, small, x, **kw)
    print(f"bench_compress: MLP {args.dim}-{args.hidden}-(SwiGLU {2 * args.hidden})-{args.dim}, batch "
          f"{args.batch}, float32, {args.threads} thread(s), {args.clock} clock, median of {args.repeats}, "
          f"torch {torch.__version__}")
    head = f"{'compression':<34}{'fp32 size':>11}{'size':>11}{'ratio':>8}{'fp32 ms':>10}{'ms':>10}{'speedup':>9}{'max err':>10}"
    print(head)
    for name, r in rows.items():
        print(f"{name:<34}{r.original_bytes / 1e6:>8.1f} MB{r.compressed_bytes / 1e6:>8.1f} MB{r.size_ratio:>7.3f}x"
              f"{r.original_ms:>10.2f}{r.compressed_ms:>10.2f}{r.speedup:>8.2f}x{r.max_abs_error:>10.2g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": {k: v.to_dict() for k, v in rows.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
