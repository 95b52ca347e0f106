"""Small helpers shared inside torchfast (not public API)."""

from __future__ import annotations

import contextlib
import copy
import logging
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


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode inside the block (dropout off, batch-norm running statistics), then every
    submodule's own mode back: a model may hold frozen submodules in eval mode while it trains, which
    model.train() would lose."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _DropRecords(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(t in record.getMessage() for t in self.texts)


@contextlib.contextmanager
def dropped_log_records(logger_names: list[str], *texts: str) -> Iterator[None]:
    """Inside the block, records of these loggers ("" is the root logger) whose message contains one of
    `texts` are dropped; every other record passes. For notices a library logs on every call that say
    nothing about the user's model."""
    drop = _DropRecords(texts)
    loggers = [logging.getLogger(n) for n in logger_names]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
