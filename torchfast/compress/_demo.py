"""The compression stage of `torchfast demo`: prune + shrink, quantize, ONNX int8, one comparison table."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from torchfast._util import eval_mode
from torchfast.compress._compare import compare
from torchfast.compress._onnx import quantize_onnx
from torchfast.compress._prune import prune
from torchfast.compress._quantize import quantize
from torchfast.compress._shrink import shrink

DEMO_REPEATS = 15
DISTILL_STEPS = 200


def distill(student: nn.Module, teacher: nn.Module, data: torch.Tensor, steps: int = DISTILL_STEPS,
            lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Fine-tune `student` (in place) to reproduce `teacher`'s outputs, by MSE on fresh inputs drawn
    like `data` (per-feature mean and std), `steps` Adam steps. After pruning, this recovers most of
    what the removed units did without needing the original training data or labels."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = data.float().mean(0), data.float().std(0)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    student.train()
    for _ in range(steps):
        x = torch.randn(data.shape, generator=gen) * std + mean
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return student.eval()


def demo_stage(model: nn.Module, data: torch.Tensor, *, repeats: int = DEMO_REPEATS) -> list[str]:
    """Compress the demo's trained model three ways and return the comparison table as lines.

    Rows: 50% ln_structured pruning + shrink (PyTorch), then `distill` to win back accuracy, torchao
    int8_dynamic (PyTorch), and the ONNX export quantized with onnxruntime (dynamic int8) against the
    float ONNX export (settings chosen for this CPU and checked by quantize_onnx); each against its float original on `data` (a batch of inputs), timed interleaved
    in one run (1 thread, median of `repeats`). `model` runs in eval mode and gets its modes back; it is
    not otherwise modified. Raises what the compression functions raise."""
    with eval_mode(model):
        rows = _rows(model, data, repeats)
    lines = [f"           {'':<26}{'size':>8}{'speed':>9}{'max err':>10}{'rel err':>9}",
             *(f"           {name:<26}{r.size_ratio:>7.2f}x{r.speedup:>8.2f}x{r.max_abs_error:>10.2g}"
               f"{r.rel_error:>9.2%}  ({note})" for name, r, note in rows)]
    return [f"  compress batch {data.shape[0]}, ratios against the float model, 1 thread, median of {repeats}; "
            f"max err = largest output change, rel err = ||change|| / ||output|| (the pruned model distilled "
            f"from the float one for {DISTILL_STEPS} steps)", *lines]


def _rows(model: nn.Module, data: torch.Tensor, repeats: int) -> list:
    from torchfast import export

    rows = []
    with torch.random.fork_rng():
        small = distill(shrink(prune(model, 0.5, method="ln_structured")), model, data)
    rows.append(("prune 50% + shrink", compare(model, small, data, repeats=repeats, threads=1),
                 f"{sum(p.numel() for p in small.parameters()):,} of {sum(p.numel() for p in model.parameters()):,} params"))
    rows.append(("int8 dynamic (torchao)", compare(model, quantize(model, mode="int8_dynamic"), data,
                                                   repeats=repeats, threads=1), "PyTorch eager"))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        export.onnx(model, (data[:8],), fp32)
        q = quantize_onnx(fp32, int8, mode="dynamic", calibration_data=data)  # raises beyond its bound
        rows.append(("onnx int8 (onnxruntime)", compare(fp32, int8, data, repeats=repeats, threads=1),
                     f"vs float ONNX; reduce_range={q.reduce_range}: {q.settings}"))
    return rows
