"""Where torchfast.optimize looks, and what it offers in place of what it finds.

Each rule turns a spot in the module tree into a `Candidate`: the child slots on one parent it would
replace, the original computation (a module) and one or more replacement builders, tried in order;
the first whose module matches the original on probe inputs wins. Rules look at structure only
(classes from torch.nn, child names, parameter names, an epsilon attribute); what a user-defined
module computes is left to the probe, so a class named Swish that computes something else is never
swapped, and one named Act that computes x * sigmoid(x) is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

import torchfast.nn as tfnn
from torchfast._optimize._modules import GatedMLP
from torchfast.ops.linear import cpu_matmul_backend

# Rule names, usable in include= / exclude= patterns.
RULES = ("silu", "gelu", "layer_norm", "rms_norm", "linear_act", "gated_mlp", "activation", "linear")

EPS_ATTRS = ("variance_epsilon", "eps", "epsilon", "norm_eps", "rms_norm_eps", "layer_norm_eps")
# (gate, up, down) child names of gated MLPs: Llama/Mistral/Qwen/Gemma, Meta's Llama and Mixtral, plain, T5.
GATED_NAMES = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("gate", "up", "down"),
    ("wi_0", "wi_1", "wo"),
)
TORCHFAST_MODULES = (
    tfnn.Swish,
    tfnn.GELU,
    tfnn.Linear,
    tfnn.LayerNorm,
    tfnn.RMSNorm,
    tfnn.SwiGLU,
    tfnn.GeGLU,
    GatedMLP,
)
ACT_SHAPES = ((4, 16), (2, 3, 8))
ACTS = {
    "swish": ("torchfast.nn.Swish", lambda: tfnn.Swish()),
    "gelu": ("torchfast.nn.GELU", lambda: tfnn.GELU()),
    "gelu_tanh": ("torchfast.nn.GELU(approximate='tanh')", lambda: tfnn.GELU(approximate="tanh")),
}

Builder = Callable[[], nn.Module]


@dataclass
class Candidate:
    """Replace parent.<slots[0]> by a built module (and any further slots by nn.Identity)."""

    rule: str
    parent: nn.Module
    slots: list[str]
    qualnames: list[str]
    old: str
    original: nn.Module
    shapes: tuple[tuple[int, ...], ...]
    options: list[tuple[str, Builder]] = field(default_factory=list)
    unsupported: str | None = None

    @property
    def name(self) -> str:
        return " + ".join(n or "(model)" for n in self.qualnames)


def describe(module: nn.Module) -> str:
    cls = type(module)
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__name__}"
    return cls.__name__


def is_user_class(module: nn.Module) -> bool:
    return not type(module).__module__.startswith(("torch.", "torchfast."))


def _stateless(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _with_params(new: nn.Module, old: nn.Module, names=("weight", "bias")) -> nn.Module:
    """`new` (built on the meta device) holding `old`'s own parameter objects: no copy, and optimizers
    or DDP that already hold them keep working."""
    for n in names:
        if n in new._parameters:
            setattr(new, n, getattr(old, n, None))
    return new


def _norm_shapes(shape) -> tuple[tuple[int, ...], ...]:
    return ((4, *shape), (2, 3, *shape))


MIN_LINEAR_WEIGHT = 256 * 256  # with torchfast.ops.linear's 2^24 multiply-adds: from 256 tokens a call


def plain_linear_candidate(parent, slot, qualname, child) -> Candidate | None:
    """A float32 CPU nn.Linear not fused with anything -> torchfast.nn.Linear (activation None), whose
    GEMMs go through oneDNN; offered only where that is the faster library (`cpu_matmul_backend()` is
    "onednn") and for weights of at least MIN_LINEAR_WEIGHT elements: elsewhere the swap would change
    nothing (a smaller layer needs thousands of tokens per call to reach oneDNN's threshold)."""
    if type(child) is not nn.Linear or cpu_matmul_backend() != "onednn":
        return None
    w = child.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.numel() < MIN_LINEAR_WEIGHT:
        return None
    c = Candidate(
        "linear",
        parent,
        [slot],
        [qualname],
        "nn.Linear",
        child,
        ((4, child.in_features), (2, 3, child.in_features)),
    )
    if any(p is not None and type(p) is not nn.Parameter for p in (child.weight, child.bias)):
        c.unsupported = "its weight is not a plain Parameter (quantized or otherwise wrapped)"
    else:
        c.options = [("torchfast.nn.Linear", lambda: tfnn.Linear.from_linear(child, None))]
    return c


def known_candidate(parent, slot, qualname, child) -> Candidate | None:
    """nn.SiLU, nn.GELU, nn.LayerNorm, nn.RMSNorm (exact classes; subclasses go through user_candidate)."""
    cls = type(child)
    c = Candidate("", parent, [slot], [qualname], describe(child), child, ACT_SHAPES)
    if cls is nn.SiLU:
        c.rule = "silu"
        c.options = [("torchfast.nn.Swish", lambda: tfnn.Swish(inplace=child.inplace))]
    elif cls is nn.GELU:
        c.rule = "gelu"
        approx = child.approximate
        new = "torchfast.nn.GELU" + ("" if approx == "none" else f"(approximate={approx!r})")
        c.options = [(new, lambda: tfnn.GELU(approximate=approx))]
    elif cls in (nn.LayerNorm, nn.RMSNorm):
        # Same constructor as the torch class (LayerNorm adds `bias`); the parameters are shared.
        layer = cls is nn.LayerNorm
        c.rule, c.shapes = ("layer_norm" if layer else "rms_norm"), _norm_shapes(child.normalized_shape)
        extra = {"bias": child.bias is not None} if layer else {}
        tf_cls = tfnn.LayerNorm if layer else tfnn.RMSNorm

        def build():
            fresh = tf_cls(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                           device="meta", **extra)
            return _with_params(fresh, child)

        c.options = [(f"torchfast.nn.{tf_cls.__name__}", build)]
    else:
        return None
    return c


def _eps_of(module) -> float | None:
    for attr in EPS_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def user_candidate(parent, slot, qualname, child) -> Candidate | None:
    """A user-defined leaf module: stateless -> an activation (swish / gelu / gelu tanh); a `weight`
    and an epsilon attribute -> RMSNorm; `weight`, `bias` and an epsilon -> LayerNorm."""
    if not (is_user_class(child) or isinstance(child, (nn.SiLU, nn.GELU, nn.LayerNorm, nn.RMSNorm))):
        return None
    if any(True for _ in child.children()):
        return None
    params = {n for n, _ in child.named_parameters()}
    c = Candidate("", parent, [slot], [qualname], describe(child), child, ACT_SHAPES)
    if _stateless(child):
        c.rule = "activation"
        c.options = list(ACTS.values())
        return c
    if any(True for _ in child.buffers()) or params not in ({"weight"}, {"weight", "bias"}):
        return None
    eps = _eps_of(child)
    kind = "rms_norm" if params == {"weight"} else "layer_norm"
    c.rule = kind
    if eps is None:
        if "norm" not in type(child).__name__.lower():
            return None
        c.unsupported = f"no epsilon attribute (looked for {', '.join(EPS_ATTRS)})"
        return c
    shape = tuple(child.weight.shape)
    c.shapes = _norm_shapes(shape)
    if kind == "rms_norm":
        c.options = [
            ("torchfast.nn.RMSNorm", lambda: _with_params(tfnn.RMSNorm(shape, eps=eps, device="meta"), child))
        ]
    else:
        c.options = [
            (
                "torchfast.nn.LayerNorm",
                lambda: _with_params(tfnn.LayerNorm(shape, eps=eps, device="meta"), child),
            )
        ]
    return c


def _act_of(module: nn.Module) -> list[tuple[str, str]] | None:
    """(act name, Linear activation) options for an activation module following an nn.Linear."""
    if type(module) in (nn.SiLU, tfnn.Swish):
        return [("swish", "swish")]
    if type(module) in (nn.GELU, tfnn.GELU):
        return [("gelu", "gelu" if module.approximate == "none" else "gelu_tanh")]
    if type(module) is nn.ReLU:
        return [("relu", "relu")]
    if is_user_class(module) and _stateless(module) and not any(True for _ in module.children()):
        return [("swish", "swish"), ("gelu", "gelu"), ("gelu_tanh", "gelu_tanh")]
    return None


def linear_act_candidate(seq: nn.Sequential, i: int, prefix: str) -> Candidate | None:
    """seq[i] an nn.Linear directly followed by a supported activation seq[i + 1]."""
    keys = list(seq._modules)
    lin, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
    if type(lin) is not nn.Linear or lin is act:
        return None
    acts = _act_of(act)
    if acts is None:
        return None
    names = [f"{prefix}{keys[i]}", f"{prefix}{keys[i + 1]}"]
    c = Candidate(
        "linear_act",
        seq,
        [keys[i], keys[i + 1]],
        names,
        f"nn.Linear + {describe(act)}",
        nn.Sequential(lin, act),
        ((4, lin.in_features), (2, 3, lin.in_features)),
    )
    for _, fused in acts:
        c.options.append(
            (
                f"torchfast.nn.Linear(activation={fused!r}) + nn.Identity",
                lambda fused=fused: nn.Sequential(tfnn.Linear.from_linear(lin, fused), nn.Identity()),
            )
        )
    return c


def gated_mlp_candidate(parent, slot, qualname, child) -> Candidate | None:
    """A module with three nn.Linear children named like (gate, up, down) projections."""
    for names in GATED_NAMES:
        linears = [child._modules.get(n) for n in names]
        if all(type(m) is nn.Linear for m in linears):
            break
    else:
        return None
    gate, up, down = linears
    c = Candidate(
        "gated_mlp",
        parent,
        [slot],
        [qualname],
        describe(child),
        child,
        ((4, gate.in_features), (2, 3, gate.in_features)),
    )
    own = [n for n in list(child._parameters) + list(child._buffers) if getattr(child, n, None) is not None]
    others = [(n, m) for n, m in child.named_children() if n not in names]
    if own:
        c.unsupported = (
            f"holds its own parameters or buffers ({', '.join(own)}), which the fused module has no place for"
        )
    elif any(
        not _stateless(m) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) for _, m in others
    ):
        extra = ", ".join(f"{n} ({describe(m)})" for n, m in others)
        c.unsupported = f"has other children with state or dropout ({extra})"
    elif not (
        gate.in_features == up.in_features == down.out_features
        and gate.out_features == up.out_features == down.in_features
    ):
        c.unsupported = (
            "projection sizes do not form a gated MLP (gate/up: hidden -> inter, down: inter -> hidden)"
        )
    if c.unsupported:
        return c
    standard = names == GATED_NAMES[0]
    hidden, inter = gate.in_features, gate.out_features

    def build(act: str) -> nn.Module:
        if not standard:
            return GatedMLP(gate, up, down, names, act)
        if act == "swish":
            new = tfnn.SwiGLU(hidden, inter, device="meta")
        else:
            new = tfnn.GeGLU(
                hidden, inter, device="meta", approximate="tanh" if act == "gelu_tanh" else "none"
            )
        new.gate_proj, new.up_proj, new.down_proj = gate, up, down
        return new

    label = {
        "swish": "torchfast.nn.SwiGLU",
        "gelu": "torchfast.nn.GeGLU",
        "gelu_tanh": "torchfast.nn.GeGLU(approximate='tanh')",
    }
    if not standard:
        label = {a: f"GatedMLP(act={a!r}, names={'/'.join(names)})" for a in label}
    c.options = [(label[a], lambda a=a: build(a)) for a in ("swish", "gelu", "gelu_tanh")]
    return c
