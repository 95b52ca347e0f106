"""Small helpers shared inside torchfast (not public API)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored on exit (even on error)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def has_hooks(m: nn.Module) -> bool:
    """Whether hooks registered on `m` itself (forward, forward-pre, backward, backward-pre) would run
    on its call: a module replaced or bypassed would silently drop them."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def deepcopy_module(model: nn.Module) -> nn.Module:
    """copy.deepcopy(model), also for a model pruned with torch.nn.utils.prune: before prune.remove it
    keeps `weight = weight_orig * weight_mask` as a plain attribute that is not a graph leaf, which
    deepcopy refuses. Its copy is a detached clone (the pruning hook recomputes it on the next forward
    anyway)."""
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and not t.is_leaf}
    return copy.deepcopy(model, memo)
