"""`prune` and `sparsity_report`: torch.nn.utils.prune applied to a whole model, torchfast modules included."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from torchfast.compress._common import PRUNABLE, check_choice, check_module, fail, working_copy
from torchfast.compress._structure import find_groups
from torchfast.nn.glu import _GatedMLP

METHODS = ("l1_unstructured", "random_unstructured", "ln_structured")
SCOPES = ("layer", "global")
_UNSTRUCTURED = {"l1_unstructured": tprune.L1Unstructured, "random_unstructured": tprune.RandomUnstructured}


def _check_amount(amount) -> float:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0.0 <= float(amount) <= 1.0:
        raise fail("prune", "amount", f"must be a number in [0, 1] (the fraction of weights or units to "
                   f"prune), got {amount!r}")
    return float(amount)


def _resolve(model: nn.Module, original: nn.Module, modules, method: str) -> list[nn.Module]:
    """The layers of `model` (the working copy) to prune. `modules` names layers of `original` by
    qualified name or by the module object; None means every layer the method applies to."""
    if modules is None:
        if method == "ln_structured":
            return [p for g in find_groups(model) for p in g.producers]
        return [m for m in model.modules() if isinstance(m, PRUNABLE)]
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    names_of = {id(m): n for n, m in original.named_modules()}
    in_copy = dict(model.named_modules())
    layers: list[nn.Module] = []
    for entry in modules:
        name = entry if isinstance(entry, str) else names_of.get(id(entry))
        if name is None or name not in in_copy:
            raise fail("prune", "modules", f"holds {entry if isinstance(entry, str) else type(entry).__name__!r}, "
                       "which is not a submodule of the model (give qualified names from "
                       "model.named_modules(), or the submodules themselves)")
        mod = in_copy[name]
        if isinstance(mod, _GatedMLP):
            # Its hidden units are the intermediate features, made by gate_proj and up_proj together.
            layers += [mod.gate_proj, mod.up_proj] + ([] if method == "ln_structured" else [mod.down_proj])
        elif isinstance(mod, PRUNABLE):
            layers.append(mod)
        else:
            raise fail("prune", "modules", f"names {name!r}, a {type(mod).__name__}; only nn.Linear, nn.Conv* "
                       "(torchfast.nn.Linear included) and torchfast SwiGLU/GeGLU can be pruned")
    return list({id(m): m for m in layers}.values())


def _row_mask(norms: torch.Tensor, amount: float) -> torch.Tensor:
    """1 for the rows kept, 0 for the round(amount * rows) rows of smallest norm (torch's rounding)."""
    k = tprune._compute_nparams_toprune(amount, norms.numel())
    mask = torch.ones_like(norms)
    if k:
        mask[torch.topk(norms, k, largest=False).indices] = 0
    return mask


def _prune_rows(layers: list[nn.Module], amount: float, n) -> None:
    """Ln-structured pruning of whole output units (dim 0), shared by `layers` (gate_proj and up_proj
    of one gated MLP are scored together, since their units are multiplied), bias entries included: a
    pruned unit is removed whole, so that `shrink` can cut it out."""
    w = torch.cat([layer.weight.detach().flatten(1) for layer in layers], dim=1)
    keep = _row_mask(torch.linalg.vector_norm(w.float(), ord=n, dim=1), amount)
    for layer in layers:
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        tprune.custom_from_mask(layer, "weight", keep.view(shape).expand_as(layer.weight).to(layer.weight.dtype))
        if layer.bias is not None:
            tprune.custom_from_mask(layer, "bias", keep.to(layer.bias.dtype))


def prune(model: nn.Module, amount: float, *, method: str = "l1_unstructured", scope: str = "layer",
          modules=None, permanent: bool = True, n: float = 2, inplace: bool = False) -> nn.Module:
    """Prune the weights of a model's Linear and Conv layers with torch.nn.utils.prune.

    Args:
        model: any nn.Module. Its nn.Linear, nn.Conv* and the layers inside torchfast modules
            (torchfast.nn.Linear, the gate_proj / up_proj / down_proj of SwiGLU and GeGLU) are pruned.
        amount: the fraction in [0, 1] of weights (unstructured) or output units (structured) to zero.
        method: "l1_unstructured" (smallest |w| per layer or globally), "random_unstructured", or
            "ln_structured": whole output units (rows of a Linear, output channels of a Conv) with the
            smallest L`n` norm, together with their bias entries. The gate_proj and up_proj of a
            SwiGLU/GeGLU are pruned as one: the same units, scored on both weights.
        scope: "layer" prunes `amount` of each layer; "global" prunes `amount` of all the chosen
            weights together (torch.nn.utils.prune.global_unstructured), so layers end up with different
            sparsities. "global" takes the unstructured methods only.
        modules: which layers: qualified names (as in model.named_modules()) or the submodules
            themselves; a SwiGLU/GeGLU stands for its projections. None: every Linear/Conv for the
            unstructured methods; for "ln_structured" the layers whose units `shrink` can remove (hidden
            layers of nn.Sequential chains and the gated MLPs' intermediate features, see
            torchfast/compress/_structure.py), so the model's outputs keep every unit.
        permanent: call torch.nn.utils.prune.remove, leaving plain parameters with zeros in them; with
            False the pruning re-parametrisation (weight_orig, weight_mask, a forward pre-hook) stays.
        n: the norm order of "ln_structured" (2, 1, float("inf"), ...).
        inplace: prune `model` itself; by default it is deep-copied first and left unchanged.

    Returns the pruned model (the same object when inplace). Module types are unchanged, so torchfast
    modules keep running their fused kernels, and the model still trains and exports. Raises
    ValueError/TypeError for a bad argument and ValueError when there is nothing to prune.
    """
    original = check_module("prune", model)
    amount = _check_amount(amount)
    check_choice("prune", "method", method, METHODS)
    check_choice("prune", "scope", scope, SCOPES)
    if scope == "global" and method == "ln_structured":
        raise fail("prune", "scope", "is 'global', which torch.nn.utils.prune offers for unstructured methods "
                   "only (global_unstructured); use method='l1_unstructured'/'random_unstructured', or "
                   "scope='layer' for ln_structured")
    model = working_copy(original, inplace)
    layers = _resolve(model, original, modules, method)
    if not layers:
        what = ("no hidden layers whose units shrink can remove (see torchfast.compress.prune's docstring); "
                "name the layers with modules=") if method == "ln_structured" else "no nn.Linear or nn.Conv layers"
        raise fail("prune", "model", f"has nothing to prune: {what}")

    if method == "ln_structured":
        # gate or up -> (gate, up): a gated MLP's units are pruned in both at once
        gated = {id(p): g.producers for g in find_groups(model) if g.gated is not None for p in g.producers}
        chosen = {id(m) for m in layers}
        done: set[int] = set()
        for layer in layers:
            if id(layer) in done:
                continue
            pair = gated.get(id(layer))
            group = [m for m in pair if id(m) in chosen] if pair else [layer]
            _prune_rows(group, amount, n)
            done.update(id(m) for m in group)
    elif scope == "global":
        tprune.global_unstructured([(m, "weight") for m in layers], pruning_method=_UNSTRUCTURED[method],
                                   amount=amount)
    elif method == "l1_unstructured":
        for m in layers:
            tprune.l1_unstructured(m, "weight", amount)
    else:
        for m in layers:
            tprune.random_unstructured(m, "weight", amount)

    if permanent:
        make_permanent(model)
    return model


def make_permanent(model: nn.Module) -> None:
    """torch.nn.utils.prune.remove on every pruned parameter: plain parameters, zeros kept."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(m, hook._tensor_name)


@dataclass
class SparsityReport:
    """What `sparsity_report` returns: one row per Linear/Conv layer and the total over them.

    `layers` maps the layer's qualified name to {"type", "shape", "params", "zeros", "sparsity",
    "zero_units", "units"}: zero_units counts output units (rows) that are entirely zero, the ones
    `shrink` can remove. `str(report)` is the table; `to_dict()` the plain dict."""

    layers: dict[str, dict]
    total: dict

    def to_dict(self) -> dict:
        return {"layers": {k: dict(v) for k, v in self.layers.items()}, "total": dict(self.total)}

    def table(self) -> str:
        rows = [("layer", "type", "shape", "params", "zeros", "sparsity", "zero units")]
        for name, r in self.layers.items():
            rows.append((name, r["type"], "x".join(map(str, r["shape"])), f"{r['params']:,}", f"{r['zeros']:,}",
                         f"{r['sparsity']:.1%}", f"{r['zero_units']}/{r['units']}"))
        t = self.total
        rows.append(("total", "", "", f"{t['params']:,}", f"{t['zeros']:,}", f"{t['sparsity']:.1%}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        return "\n".join(fmt(r) for r in rows)

    __str__ = table


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer and total sparsity of the weights of a model's Linear and Conv layers (torchfast
    modules' inner layers included; pruned but not yet permanent layers count their masked weight).
    Biases are not counted. Returns a SparsityReport: print it for the table, .to_dict() for a dict."""
    check_module("sparsity_report", model)
    layers: dict[str, dict] = {}
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE):
            continue
        w = m.weight.detach()
        if type(w) is not torch.Tensor and hasattr(w, "dequantize"):  # a torchao quantized weight
            w = w.dequantize()
        zeros = int((w == 0).sum())
        units = int(w.shape[0])
        zero_units = int((w.reshape(units, -1) == 0).all(dim=1).sum()) if units else 0
        layers[name or "<model>"] = {"type": type(m).__name__, "shape": tuple(w.shape), "params": w.numel(),
                                     "zeros": zeros, "sparsity": zeros / max(1, w.numel()),
                                     "zero_units": zero_units, "units": units}
    params = sum(r["params"] for r in layers.values())
    zeros = sum(r["zeros"] for r in layers.values())
    return SparsityReport(layers, {"params": params, "zeros": zeros, "sparsity": zeros / max(1, params)})
