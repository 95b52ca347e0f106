"""Helpers shared by the normalization tests (test_rms_norm.py, test_layer_norm.py)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = (torch.bfloat16, torch.float16)


def tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor)]


def reference_grads(reference, leaves, kwargs, grad_outputs):
    """Outputs and input gradients of `reference` run in float64 on the same (rounded) inputs, by
    autograd: an independent check of the fused backward formulas."""
    ref_leaves = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in leaves]
    outs = reference(*ref_leaves, **kwargs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    inputs = tensors(ref_leaves)
    if outs[0].numel() == 0:
        return outs, [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(outs, inputs, [g.double() for g in grad_outputs])
    return outs, list(grads)


def saved_tensors_of(fn):
    """(tensors autograd saved while running fn, fn's result)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def ops_run_during(fn) -> list:
    """The ops that reach the dispatcher's Python mode (below autograd and autocast) while fn runs."""
    with _Record() as rec:
        fn()
    return rec.ops


def sum_atol(terms: torch.Tensor, dtype: torch.dtype) -> float:
    """Absolute tolerance of a weight gradient, a sum over rows (dim 0 of `terms`) accumulated in fp32
    (fp64 for float64): the first-order bound of recursive summation, 2 * eps * sum(|terms|), plus one
    rounding of the result to `dtype` (that part is in the table's rtol)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 2 * eps * float(terms.abs().sum(0).max())
