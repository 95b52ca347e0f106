"""`shrink`: cut structurally pruned hidden units out of a model, making its layers smaller.

torch.nn.utils.prune only multiplies weights by a mask, so a 50%-pruned model is as large and as slow
as the dense one. Here a hidden unit whose producing rows are all zero is removed: its row (and bias
entry) in the producing layer, its feature in any batch norm between, and its input column in the
consuming layer. Such a unit is not necessarily zero: it is the constant c = between(producer(0)) (for
example act(bias)), which the consumer saw as W[:, i] * c; that term is folded into the consumer's bias,
so the shrunk model computes what the masked model computed, up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from torchfast._util import eval_mode
from torchfast.compress._common import check_module, fail, working_copy
from torchfast.compress._prune import make_permanent
from torchfast.compress._structure import BATCH_NORM, UnitGroup, find_groups
from torchfast.nn.glu import GeGLU
from torchfast.ops.glu import geglu, swiglu


def _zero_rows(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return (w.reshape(w.shape[0], -1) == 0).all(dim=1)


def _bias_or_zeros(layer: nn.Module, n: int) -> torch.Tensor:
    w = layer.weight
    return layer.bias.detach() if layer.bias is not None else torch.zeros(n, dtype=w.dtype, device=w.device)


def _constants(g: UnitGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(removable, c): which units are constant because their producing rows are zero, and the
    constant each unit then takes (only the removable entries are meaningful)."""
    if g.gated is not None:
        gate, up = g.producers
        n = gate.weight.shape[0]
        gz, uz = _zero_rows(gate), _zero_rows(up)
        g0, u0 = _bias_or_zeros(gate, n), _bias_or_zeros(up, n)
        # act(g0), through the module's own fused op (times ones): the unit is act(gate) * up.
        ones = torch.ones_like(g0)
        a0 = geglu(g0, ones, approximate=g.gated.approximate) if isinstance(g.gated, GeGLU) else swiglu(g0, ones)
        removable = (gz & uz) | (gz & (a0 == 0)) | (uz & (u0 == 0))
        return removable, torch.where(gz & uz, a0 * u0, torch.zeros_like(a0))
    (producer,) = g.producers
    n = producer.weight.shape[0]
    if isinstance(producer, nn.Linear):
        x = producer(producer.weight.new_zeros(1, producer.in_features))  # bias, through a fused activation
    else:  # a Conv of a zero input is its bias at every position, whatever the padding
        x = _bias_or_zeros(producer, n).view((1, n) + (1,) * (producer.weight.dim() - 2))
    with eval_mode(*g.between):
        for m in g.between:
            x = m(x)
    return _zero_rows(producer), x.reshape(n)


def _zero_padded(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear) or layer.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding of a constant channel is the same constant
    return layer.padding == "same" or any(p != 0 for p in layer.padding)


def _set(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _shrink_group(g: UnitGroup) -> int:
    removable, c = _constants(g)
    # Zero padding makes a constant channel non-constant at the borders of the next conv's input, so
    # only units that are exactly 0 can leave there.
    if any(_zero_padded(layer) for layer in g.consumers):
        removable &= c == 0
    if removable.all():
        removable[0] = False  # keep one unit: a zero-width layer is legal in torch but not in every runtime
    if not removable.any():
        return 0
    keep = (~removable).nonzero().squeeze(1)
    c_removed = c[removable]
    for layer in g.consumers:
        cols = layer.weight.detach()[:, removable]
        if c_removed.any():
            term = cols.reshape(cols.shape[0], cols.shape[1], -1).sum(2) @ c_removed.to(cols.dtype)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(term), requires_grad=layer.weight.requires_grad)
            _set(layer, "bias", layer.bias.detach() + term)
        _set(layer, "weight", layer.weight.detach()[:, keep])
        if isinstance(layer, nn.Linear):
            layer.in_features = len(keep)
        else:
            layer.in_channels = len(keep)
    for layer in g.producers:
        _set(layer, "weight", layer.weight.detach()[keep])
        if layer.bias is not None:
            _set(layer, "bias", layer.bias.detach()[keep])
        if isinstance(layer, nn.Linear):
            layer.out_features = len(keep)
        else:
            layer.out_channels = len(keep)
    for m in g.between:
        if isinstance(m, BATCH_NORM):
            for name in ("weight", "bias"):
                if getattr(m, name) is not None:
                    _set(m, name, getattr(m, name).detach()[keep])
            for name in ("running_mean", "running_var"):
                if getattr(m, name) is not None:
                    setattr(m, name, getattr(m, name)[keep].contiguous())
            m.num_features = len(keep)
    if g.gated is not None:
        g.gated.intermediate_size = len(keep)
    return int(removable.sum())


def shrink(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Physically remove the hidden units that structured pruning zeroed, so the model gets smaller and
    faster while computing the same outputs as the masked model (up to float rounding).

    Recognised hidden units (torchfast/compress/_structure.py): the features between two layers of an
    nn.Sequential (Linear -> elementwise activations / dropout / batch norm -> Linear; Conv1d/2d/3d
    without groups -> ... -> Conv of the same kind; torchfast SwiGLU/GeGLU count as layers there), and
    the intermediate features of torchfast SwiGLU/GeGLU (rows of gate_proj and up_proj, columns of
    down_proj). A unit is removed when its producing rows are all zero (after
    `prune(..., method="ln_structured")`, or any pruning that left whole rows zero). Its constant output
    (e.g. act(bias)) is folded into the next layer's bias; before a zero-padded conv, where that is not
    exact at the borders, only units that output exactly 0 are removed.

    Pruning re-parametrisations still attached (prune(..., permanent=False)) are made permanent first.
    Module types and parameter names are kept (torchfast modules keep their fused kernels; the model
    still trains and exports); only sizes change. Returns the shrunk model: a deep copy unless
    `inplace`. Raises ValueError when no unit can be removed.
    """
    original = check_module("shrink", model)
    model = working_copy(original, inplace)
    make_permanent(model)
    groups = find_groups(model)
    with torch.no_grad():
        removed = sum(_shrink_group(g) for g in groups)
    if not removed:
        where = "no hidden-unit groups were found" if not groups else \
            f"none of the {len(groups)} hidden-unit groups has a unit whose producing rows are all zero"
        raise fail("shrink", "model", f"has nothing to shrink: {where}; prune it first with "
                   "torchfast.compress.prune(model, amount, method='ln_structured')")
    return model
