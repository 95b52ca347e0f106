"""Comparing a candidate's tensors with the original's, and running a module forward and backward.

The bound is the tolerance table of torchfast.testing (one rounding of the dtype), applied with the
absolute part scaled by the tensor's largest magnitude: gradients and whole-model outputs have no
natural unit, and an atol of 1e-6 on values of size 100 would demand more than float32 can hold.

Low precision (bfloat16, float16): a candidate and the original each round differently, so both are
measured against the original computed in float32 on the same (rounded) inputs and weights. The
candidate passes when it is within the table's bound of that reference, or no further from it than
`SLACK` times the original's own error in the low dtype: never less accurate than what it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchfast.testing import TOLERANCES

LOW = (torch.bfloat16, torch.float16)
SLACK = 2.0
# Gradients pass through one more rounding (and, for weights, a sum over rows) than outputs: their
# tolerance is this many times the outputs'.
GRAD_SCALE = 4.0


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in: float32 for the low-precision dtypes, else the dtype itself."""
    return torch.float32 if dtype in LOW else dtype


@dataclass
class Mismatch:
    what: str
    max_error: float
    bound: float

    def __str__(self) -> str:
        return f"{self.what}: max abs error {self.max_error:.3g} (allowed {self.bound:.3g})"


def _max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    g, r = got.detach().double(), ref.detach().double().to(got.device)
    finite = g.isfinite() & r.isfinite()
    if bool(((g.isnan() != r.isnan()) | (~finite & ~g.isnan() & (g != r))).any()):
        return float("inf")  # NaN where the original has none, or infinities that differ
    return float((g - r).abs()[finite].max()) if bool(finite.any()) else 0.0


def compare(
    got: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    *,
    scale: float = 1.0,
    baseline: torch.Tensor | None = None,
) -> Mismatch | None:
    """None when `got` (computed in `dtype`) matches `ref`, else what differs and by how much.

    |got - ref| <= scale * (rtol * |ref| + atol * max(1, max|ref|)) elementwise, (rtol, atol) from
    TOLERANCES[dtype]; for low dtypes a `baseline` (the original in that dtype) may widen it (see the
    module docstring)."""
    if got.shape != ref.shape:
        return Mismatch(f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}", float("inf"), 0.0)
    rtol, atol = TOLERANCES.get(dtype, (0.0, 0.0))
    g, r = got.detach().double(), ref.detach().double().to(got.device)
    finite = r.isfinite()
    peak = float(r[finite].abs().max()) if bool(finite.any()) else 0.0
    bound = scale * (rtol * r.abs() + atol * max(1.0, peak))
    err = _max_err(got, ref)
    if err == 0.0:
        return None
    over = (g - r).abs() > bound
    if err != float("inf") and not bool((over & finite & g.isfinite()).any()):
        return None
    if baseline is not None and err <= SLACK * _max_err(baseline, ref):
        return None
    return Mismatch(what, err, float(bound.max()) if bound.numel() else 0.0)


def float_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a module's output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in float_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in float_tensors(o)]
    return []


def run_fwd_bwd(
    module: torch.nn.Module,
    inputs: tuple,
    grads: list[torch.Tensor],
):
    """(outputs, input grads, {param name: grad}) of `module(*inputs)`, without touching any `.grad`
    (torch.autograd.grad, not backward). Float inputs are differentiated; the output gradients are
    `grads` cast to each output's dtype."""
    xs = tuple(
        x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs
    )
    out = float_tensors(module(*xs))
    diff_in = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    wrt = diff_in + [p for _, p in params]
    outs = [o for o in out if o.requires_grad]
    gs = [g.to(o.dtype) for g, o in zip(grads, out) if o.requires_grad]
    got = torch.autograd.grad(outs, wrt, gs, allow_unused=True) if outs and wrt else [None] * len(wrt)
    in_grads = list(got[: len(diff_in)])
    p_grads = {n: g for (n, _), g in zip(params, got[len(diff_in) :])}
    return out, in_grads, p_grads
