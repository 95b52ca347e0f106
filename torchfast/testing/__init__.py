"""Helpers for testing torchfast ops, shipped so users can test their own models the same way.

`TOLERANCES` is the one tolerance table: a fused kernel computes in fp32 (fp64 for float64 inputs) and
rounds once, so its error against a float64 reference is about one rounding of the output dtype.
"""

from __future__ import annotations

import torch

# dtype -> (rtol, atol) for a fused op's output against a float64 reference of the same inputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),  # 2^-7 relative: one bf16 rounding, plus one of the input
    torch.float16: (2e-3, 1e-4),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, what: str = "output") -> None:
    """Compare in float64 with the table's tolerance for `dtype` (default: actual.dtype).

    NaN must match NaN and infinities must match in sign. On failure the message says how many
    elements differ, the worst one's index, both values, and the tolerance."""
    dt = dtype or actual.dtype
    r, a = TOLERANCES.get(dt, (1e-5, 1e-6))
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    act = actual.detach().to(torch.float64).cpu()
    exp = expected.detach().to(torch.float64).cpu()
    # Fast path, a few passes over memory (the full check below takes about 20 and costs seconds on
    # million-element tensors): every |act - exp| within the bound passes. A bound of NaN or inf (an
    # expected NaN or inf) is made 0, so those elements, and any NaN difference, go to the full check.
    bound = exp.abs().mul_(rtol).add_(atol).nan_to_num_(0.0, 0.0, 0.0)
    if bool((act - exp).abs_().le_(bound).all()):
        return
    nan_mismatch = act.isnan() != exp.isnan()
    both_finite = act.isfinite() & exp.isfinite()
    inf_mismatch = ~act.isnan() & ~exp.isnan() & ~both_finite & (act != exp)
    err = torch.where(both_finite, (act - exp).abs(), torch.zeros_like(act))
    bad = nan_mismatch | inf_mismatch | (err > atol + rtol * exp.abs().where(both_finite, torch.zeros_like(exp)))
    n_bad = int(bad.sum())
    if n_bad:
        idx = int(torch.argmax(torch.where(bad, err + (nan_mismatch | inf_mismatch).double() * 1e300, -1.0)))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), act.shape)) if act.dim() else ()
        raise AssertionError(
            f"{what}: {n_bad} of {act.numel()} elements differ beyond rtol={rtol:g}, atol={atol:g} "
            f"(dtype {dt}); worst at index {where}: got {act.flatten()[idx].item()!r}, "
            f"expected {exp.flatten()[idx].item()!r}, max abs error {err.max().item():.3g}"
        )


def cuda_available() -> bool:
    return torch.cuda.is_available()
