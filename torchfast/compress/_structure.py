"""Where a model has hidden units that structured pruning may remove and `shrink` can cut out.

A hidden-unit group is a set of features made by one layer (its output rows) and read only by the
next (its input columns), with nothing in between that mixes features:

- in any `nn.Sequential`: a Linear or Conv (or the `down_proj` of a torchfast SwiGLU/GeGLU), then any
  number of elementwise modules (activations, dropout, batch norm), then a Linear or Conv of the same
  kind (or the `gate_proj`/`up_proj` pair of a SwiGLU/GeGLU);
- inside each torchfast SwiGLU / GeGLU: the intermediate features, made by `gate_proj` and `up_proj`
  together and read by `down_proj`.

Only these patterns are recognised because only in them is "the next layer" known from the module
tree alone; a layer whose output leaves the model (the logits) or meets a residual add is never a
producer, so pruning it structurally would change the model's output shape or semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

import torchfast.nn as tfnn
from torchfast.nn.glu import _GatedMLP

# Modules that act on each feature separately, so a unit that is constant before them is constant after.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
    nn.Mish, nn.Identity, nn.Dropout, tfnn.Swish, tfnn.SiLU, tfnn.GELU,
)
BATCH_NORM = nn.modules.batchnorm._BatchNorm
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class UnitGroup:
    """Hidden features `producers` make (their output rows; two layers for a gated MLP, whose units are
    act(gate) * up) and `consumers` read (their input columns), with `between` applied per feature."""

    producers: list[nn.Module]
    consumers: list[nn.Module]
    between: list[nn.Module] = field(default_factory=list)
    gated: _GatedMLP | None = None  # the SwiGLU/GeGLU whose intermediate features these are


def n_out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def n_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _plain_layer(m: nn.Module) -> bool:
    """Linear, or a Conv1d/2d/3d without groups (a grouped conv ties channels into blocks)."""
    return isinstance(m, nn.Linear) or (isinstance(m, CONV) and m.groups == 1)


def _out_layer(m: nn.Module) -> nn.Module | None:
    if _plain_layer(m):
        return m
    if isinstance(m, _GatedMLP):
        return m.down_proj
    return None


def _in_layers(m: nn.Module) -> list[nn.Module] | None:
    if _plain_layer(m):
        return [m]
    if isinstance(m, _GatedMLP):
        return [m.gate_proj, m.up_proj]
    return None


def _same_kind(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) or (isinstance(a, nn.Linear) and isinstance(b, nn.Linear))


def find_groups(model: nn.Module) -> list[UnitGroup]:
    """Every hidden-unit group of `model` (see the module docstring), in module order."""
    groups: list[UnitGroup] = []
    for mod in model.modules():
        if isinstance(mod, _GatedMLP):
            groups.append(UnitGroup([mod.gate_proj, mod.up_proj], [mod.down_proj], gated=mod))
        if not isinstance(mod, nn.Sequential):
            continue
        items = list(mod)
        for i, a in enumerate(items):
            out = _out_layer(a)
            if out is None:
                continue
            j = i + 1
            while j < len(items) and isinstance(items[j], ELEMENTWISE + (BATCH_NORM,)):
                j += 1
            if j == len(items):
                continue
            ins = _in_layers(items[j])
            between = items[i + 1:j]
            if (ins is None or not all(_same_kind(out, b) and n_in(b) == n_out(out) for b in ins)
                    or any(isinstance(m, BATCH_NORM) and m.num_features != n_out(out) for m in between)):
                continue
            groups.append(UnitGroup([out], ins, between))
    return groups
