"""Small helpers shared inside torchfast (not public API)."""

from __future__ import annotations

import contextlib
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
