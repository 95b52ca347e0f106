"""Error bounds for gradients that sum or cancel many terms, added to the tolerance table's atol.

The table (torchfast.testing.TOLERANCES) bounds one rounding of the output dtype. A gradient that is a
sum over rows (a bias's or a weight's), or a difference of row sums (a normalization's dx), may also
carry the error of each term it adds: the kernels sum in float32 (float64 for float64) where the
float64 reference is exact. These functions give that extra absolute error from the reference's own
float64 values, so a test states a bound it can justify instead of a loosened constant.
"""

from __future__ import annotations

import torch

from torchfast.testing import TOLERANCES


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_slack(dtype: torch.dtype, terms: torch.Tensor) -> float:
    """Bound of a sum over dim 0 of `terms`, each term computed to the table's relative tolerance of the
    math type and added in it (first-order bound of recursive summation): (rtol + 2 eps) * sum|terms|,
    the largest over the remaining dims. Non-finite terms count as 0 (their NaN/inf is checked apart)."""
    m = math_dtype(dtype)
    rel = TOLERANCES[m][0] + 2 * torch.finfo(m).eps
    if terms.numel() == 0:
        return 0.0
    return rel * float(terms.abs().nan_to_num(0.0, 0.0, 0.0).sum(0).max())


def norm_grad_slack(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float | None, *, centered: bool, dtype: torch.dtype) -> list[float]:
    """Slack of rms_norm (centered=False) / layer_norm (centered=True) gradients, for x and g of shape
    [..., n] (float64, the rows in the last dim): [dx, dweight if weight, dbias if bias].

    Per row, with r = 1/std, xh = normalized x, gw = g * w:
        dx = r (gw - mean(gw) - xh mean(gw xh))  cancels terms of size r (|gw| + mean|gw| + |xh| mean|gw xh|)
        dw = sum over rows of g xh,   db = sum over rows of g.
    `eps` None means the math type's machine epsilon (as the ops take it)."""
    n = x.shape[-1]
    xf = x.detach().double().reshape(-1, n)
    gf = g.detach().double().reshape(-1, n)
    xc = xf - xf.mean(-1, keepdim=True) if centered else xf
    eps = torch.finfo(math_dtype(dtype)).eps if eps is None else eps
    r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
    xh = xc * r
    gw = gf if weight is None else gf * weight.detach().double()
    dx_terms = r * (gw.abs() + gw.abs().mean(-1, keepdim=True) + xh.abs() * (gw * xh).abs().mean(-1, keepdim=True))
    # one element of dx is a few terms: the relative bound times the largest element's term sum
    out = [sum_slack(dtype, dx_terms.nan_to_num(0.0, 0.0, 0.0).max().reshape(1, 1)) if dx_terms.numel() else 0.0]
    if weight is not None:
        out.append(sum_slack(dtype, gf * xh))
    if bias is not None:
        out.append(sum_slack(dtype, gf))
    return out
