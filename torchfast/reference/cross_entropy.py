"""Reference cross-entropy over the last dimension, with the options of LLM training losses.

For one row of logits x (V classes) with class-index target t, options eps = label_smoothing,
z = z_loss and c = softcap:

    s    = c * tanh(x / c)                    (softcap, Gemma 2; s = x without it)
    lse  = log(sum_j exp(s_j))
    loss = lse - (1 - eps) * s_t - eps * mean_j(s_j) + z * lse^2

which is F.cross_entropy's loss with label smoothing, (1 - eps) * nll + eps * mean_j(-log p_j), plus
the PaLM auxiliary z-loss. A row whose target is ignore_index has loss 0 and gradient 0. The gradient,
with p = softmax(s) and g the gradient reaching the row's loss:

    d loss / d s_j = p_j * (1 + 2 z lse) - eps / V - (1 - eps) * [j == t]
    d loss / d x_j = g * (d loss / d s_j) * (1 - (s_j / c)^2)          (the last factor with softcap)

Infinities and NaN give what F.cross_entropy gives: a NaN or +inf logit makes the row's loss and
gradient NaN, a row of only -inf logits is NaN, and a -inf target logit gives +inf.

Reductions: "none" keeps the per-row losses, "sum" adds them, "mean" divides the sum by the number of
rows whose target is not ignore_index (NaN when every row is ignored, as F.cross_entropy gives).
The math runs in float32 (float64 for float64 logits); the loss is returned in the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math type: float64 for float64 logits, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softcapped(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _safe_target(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target)).long()


def cross_entropy_rows_reference(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row lse) in the math type, shapes target.shape: what the forward op returns.
    Differentiable in logits (the lse output too)."""
    s = softcapped(logits.to(acc_dtype(logits.dtype)), softcap)
    lse = torch.logsumexp(s, dim=-1)
    # A +inf logit makes F.cross_entropy's whole row NaN (its log_softmax subtracts the infinite max);
    # torch.logsumexp would say +inf.
    lse = torch.where(s.isposinf().any(-1), torch.full_like(lse, float("nan")), lse)
    valid, t = _safe_target(target, ignore_index)
    loss = lse - (1.0 - label_smoothing) * s.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        loss = loss - label_smoothing * s.mean(-1)
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def reduce_loss(rows: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Apply `reduction` to per-row losses (math type) and return the loss in `dtype`."""
    if reduction == "none":
        return rows.to(dtype)
    total = rows.sum()
    if reduction == "mean":
        total = total / (target != ignore_index).sum()
    return total.to(dtype)


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                            softcap: float | None = None) -> torch.Tensor:
    """torchfast.cross_entropy in plain PyTorch (see the module docstring for the math)."""
    rows, _ = cross_entropy_rows_reference(logits, target, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return reduce_loss(rows, target, ignore_index, reduction, logits.dtype)


def cross_entropy_backward_reference(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                     lse: torch.Tensor, *, ignore_index: int = -100,
                                     label_smoothing: float = 0.0, z_loss: float = 0.0,
                                     softcap: float | None = None) -> torch.Tensor:
    """d loss / d logits from the per-row gradient `grad_loss` and the saved `lse` (module docstring),
    in the logits' dtype. Differentiable in grad_loss, logits and lse (the double backward)."""
    acc = acc_dtype(logits.dtype)
    s = softcapped(logits.to(acc), softcap)
    lse = lse.to(acc).unsqueeze(-1)
    valid, t = _safe_target(target, ignore_index)
    g = torch.where(valid, grad_loss.to(acc), torch.zeros((), dtype=acc, device=logits.device)).unsqueeze(-1)
    p = torch.exp(s - lse)
    d = p * (1.0 + 2.0 * z_loss * lse) - label_smoothing / logits.shape[-1]
    d = d - (1.0 - label_smoothing) * F.one_hot(t, logits.shape[-1]).to(acc)
    d = d * g
    if softcap is not None:
        d = d * (1.0 - (s / softcap).square())
    return d.to(logits.dtype)


def lse_grad_term(grad_lse: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
    """d/d logits of sum(grad_lse * lse): grad_lse * softmax(s) * softcap'(x), in the math type. Only a
    double backward sends a gradient to the lse output."""
    acc = acc_dtype(logits.dtype)
    s = softcapped(logits.to(acc), softcap)
    d = torch.exp(s - lse.to(acc).unsqueeze(-1)) * grad_lse.to(acc).unsqueeze(-1)
    if softcap is not None:
        d = d * (1.0 - (s / softcap).square())
    return d


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   softcap: float | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight, bias), target): the full logits, as unfused code builds
    them. chunk_size is accepted and ignored (it changes memory, not the result)."""
    return cross_entropy_reference(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                   softcap=softcap)


def linear_cross_entropy_backward_reference(grad_loss, hidden, weight, target, bias, lse, *, ignore_index=-100,
                                            label_smoothing=0.0, z_loss=0.0, softcap=None):
    """(d hidden, d weight, d bias or None) of the per-row losses given their gradient `grad_loss`,
    with the logits recomputed in full. Differentiable (the double backward)."""
    logits = F.linear(hidden, weight, bias)
    d = cross_entropy_backward_reference(grad_loss, logits, target, lse, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    d2 = d.reshape(-1, d.shape[-1])
    dh = (d2 @ weight.to(d.dtype)).reshape(hidden.shape).to(hidden.dtype)
    dw = (d2.t() @ hidden.reshape(-1, hidden.shape[-1]).to(d.dtype)).to(weight.dtype)
    db = None if bias is None else d2.sum(0).to(bias.dtype)
    return dh, dw, db
