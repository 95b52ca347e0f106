"""Shared helpers of torchfast.compress: argument errors, copying, which layers count."""

from __future__ import annotations

import io

import torch
from torch import nn

from torchfast._util import deepcopy_module

# Layers whose `weight` pruning and quantization act on. torchfast.nn.Linear is a subclass of
# nn.Linear, and the projections of torchfast.nn.SwiGLU / GeGLU are nn.Linear children, so the torchfast
# modules are covered by walking the module tree.
PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def fail(func: str, arg: str, why: str, kind: type[Exception] = ValueError) -> Exception:
    """The error every function here raises for a bad argument: names the function and the argument."""
    return kind(f"torchfast.compress.{func}: argument '{arg}' {why}")


def check_module(func: str, model, arg: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise fail(func, arg, f"must be a torch.nn.Module, got {type(model).__name__}", TypeError)
    return model


def check_choice(func: str, arg: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise fail(func, arg, f"is {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def working_copy(model: nn.Module, inplace: bool) -> nn.Module:
    """The model itself when inplace, else a deep copy, so that the caller's model is never changed."""
    return model if inplace else deepcopy_module(model)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: the size of the checkpoint on disk."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()
