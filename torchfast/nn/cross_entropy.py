"""Loss modules for LLM training: `CrossEntropyLoss` (a drop-in for torch.nn.CrossEntropyLoss with
class-last logits) and `LinearCrossEntropyLoss` (the output projection and the loss in one call, so the
[tokens, vocab] logits are never held in full). The math is in torchfast/reference/cross_entropy.py."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.ops.cross_entropy import cross_entropy, linear_cross_entropy

# Options whose defaults are left out of extra_repr (torch.nn.CrossEntropyLoss prints nothing).
_DEFAULTS = {"ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0, "z_loss": 0.0,
             "softcap": None, "chunk_size": None}


def _options_repr(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [f"{n}={getattr(module, n)!r}" for n in names if getattr(module, n) != _DEFAULTS[n]]


def _unsupported(cls: str, arg: str, why: str) -> ValueError:
    return ValueError(f"torchfast.nn.{cls}: argument '{arg}' is not supported ({why})")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy of class-index targets, computed by `torchfast.cross_entropy` (one fused pass per
    row; backward keeps no log-softmax).

    A subclass of torch.nn.CrossEntropyLoss with its constructor argument order; `ignore_index`,
    `reduction` and `label_smoothing` give F.cross_entropy's results. Keyword-only additions: `z_loss`
    (PaLM auxiliary loss z_loss * lse^2 per token, averaged like the loss) and `softcap` (logits pass
    through softcap * tanh(logits / softcap) first, Gemma 2).

    Not supported, each a clear error: `weight` (class weights), the deprecated `size_average` and
    `reduce` (use `reduction`), and probability (float) targets.

    Shapes: input [N, V] with target [N], [V] with a scalar target, or [..., V] with target [...]:
    the classes are the LAST dimension, as language models produce them. torch's layout for extra
    dimensions, input [N, C, d1, ...] with target [N, d1, ...] (classes in dimension 1), is not what this
    takes: such a target is refused with a message to pass `input.movedim(1, -1)`. (When d1 == C both
    layouts fit the shapes and the class-last one is used.)
    """

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None) -> None:
        name = type(self).__name__
        if weight is not None:
            raise _unsupported(name, "weight", "class weights; every class counts 1")
        for arg, value in (("size_average", size_average), ("reduce", reduce)):
            if value is not None:
                raise _unsupported(name, arg, "deprecated in torch; use reduction='mean' | 'sum' | 'none'")
        super().__init__(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if self.weight is not None:  # the buffer torch's class owns, set after construction
            raise _unsupported(name, "weight", "class weights; every class counts 1")
        if input.dim() >= 3 and isinstance(target, torch.Tensor) and not target.is_floating_point():
            ours, torchs = tuple(input.shape[:-1]), (input.shape[0], *input.shape[2:])
            if tuple(target.shape) != ours and tuple(target.shape) == torchs:
                raise RuntimeError(
                    f"torchfast.nn.{name}: input has shape {tuple(input.shape)} and target "
                    f"{tuple(target.shape)}: that is torch's layout with the classes in dimension 1 "
                    "([N, C, d1, ...]); this module takes the classes last ([..., C] with target [...]): "
                    "pass input.movedim(1, -1)")
        return cross_entropy(input, target, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        names = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap")
        return ", ".join(_options_repr(self, names))


class LinearCrossEntropyLoss(nn.Module):
    """loss = cross_entropy(hidden @ weight^T + bias, target): an LM head and its loss in one call
    (`torchfast.linear_cross_entropy`), tokens processed `chunk_size` at a time so the [tokens, vocab]
    logits never exist in full.

    Owns `weight` [vocab, in_features] and, with bias=True, `bias` [vocab], initialised as nn.Linear and
    under nn.Linear's names: the state_dict of an nn.Linear(in_features, vocab) head loads unchanged.
    `from_linear(head)` shares the parameters of an existing head instead (no copy); a tied head, whose
    weight is the embedding matrix, stays tied and the matrix gets both gradients. forward(hidden,
    target) takes hidden [..., in_features] and target [...] of class indices. The loss options are
    those of `CrossEntropyLoss` (class weights and probability targets are not supported).
    """

    def __init__(self, in_features: int, vocab: int, bias: bool = False, *, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, chunk_size: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = vocab  # nn.Linear's name, so code that reads a head's sizes works on this too
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(vocab, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(vocab, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def vocab(self) -> int:
        return self.out_features

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # nn.Linear's init, reading only weight and bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> LinearCrossEntropyLoss:
        """A loss sharing `linear`'s weight and bias (the same Parameters, no copy): optimizer, tying and
        checkpoints of the model keep working. `options` are the keyword-only loss options."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"torchfast.nn.LinearCrossEntropyLoss.from_linear: expected an nn.Linear head, "
                            f"got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  **options)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        head = [f"in_features={self.in_features}", f"vocab={self.out_features}",
                f"bias={self.bias is not None}"]
        names = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "chunk_size")
        return ", ".join(head + _options_repr(self, names))
