"""torchfast.optimize: swap torchfast's fused modules into a model someone else wrote.

It walks any nn.Module tree and replaces children by setattr on their parent (never by patching a
class or a function). Each candidate replacement is probed against the original module on random
inputs (several shapes; float32, bfloat16 and the model's dtype; forward and gradients) and kept only
when it matches; then, with verify=True, the whole model is checked against the original.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from torchfast._optimize._probe import probe
from torchfast._optimize._report import LeftAlone, OptimizeReport, Replacement
from torchfast._optimize._rules import (
    RULES,
    TORCHFAST_MODULES,
    Candidate,
    gated_mlp_candidate,
    known_candidate,
    linear_act_candidate,
    plain_linear_candidate,
    user_candidate,
)
from torchfast._optimize._verify import (
    VERIFY_SCALE,
    OptimizeVerificationError,
    check,
    infer_inputs,
    locate,
    model_dtype_device,
)
from torchfast._util import deepcopy_module, eval_mode, has_hooks

__all__ = ["RULES", "LeftAlone", "OptimizeReport", "OptimizeVerificationError", "Replacement", "optimize"]


def _patterns(value, arg: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, str) for p in items):
        raise TypeError(
            f"torchfast.optimize: argument '{arg}' must be None, a string or an iterable of strings "
            f"(glob patterns of qualified module names, or rule names: {', '.join(RULES)}), "
            f"got {value!r}"
        )
    return items


def _matches(c: Candidate, patterns: tuple[str, ...]) -> str | None:
    for p in patterns:
        if p == c.rule or any(fnmatch.fnmatchcase(n, p) for n in c.qualnames):
            return p
    return None


class _Optimizer:
    def __init__(self, model, include, exclude, dtypes, device):
        self.include, self.exclude = include, exclude
        self.dtypes, self.device = dtypes, device
        self.report = OptimizeReport()
        self.units: list[list[str]] = []
        counts: dict[int, list[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            counts.setdefault(id(m), []).append(name)
        self.shared = {k: v for k, v in counts.items() if len(v) > 1}

    def left(self, c: Candidate, reason: str, detail: str) -> None:
        self.report.left_alone.append(LeftAlone(c.name, c.rule, c.old, reason, detail))

    def try_candidate(self, c: Candidate) -> bool:
        """Probe c's options; on the first match, put it in place. True when replaced."""
        if self.exclude and (p := _matches(c, self.exclude)):
            self.left(c, "excluded", f"exclude={p!r}")
            return False
        if self.include is not None and not _matches(c, self.include):
            self.left(c, "excluded", "not matched by include=")
            return False
        shared = [
            self.shared[id(c.parent._modules[s])] for s in c.slots if id(c.parent._modules[s]) in self.shared
        ]
        if shared:
            self.left(
                c,
                "shared module",
                f"also reachable as {', '.join(shared[0])}; replacing one place would split it",
            )
            return False
        hooked = [n for s, n in zip(c.slots, c.qualnames) if has_hooks(c.parent._modules[s])]
        if hooked:
            # Hooks live on the module object: its replacement would silently not run them.
            self.left(c, "unsupported configuration",
                      f"has hooks on {', '.join(repr(n) for n in hooked)} (a user's, or pruning's), which "
                      "would not run on the replacement")
            return False
        if c.unsupported:
            self.left(c, "unsupported configuration", c.unsupported)
            return False
        misses = []
        for label, build in c.options:
            try:
                new = build()
            except Exception as e:  # noqa: BLE001 (a configuration the torchfast module rejects)
                misses.append(f"{label}: cannot build ({type(e).__name__}: {e})")
                continue
            why = probe(c.original, new, c.shapes, self.dtypes, self.device)
            if why is None:
                if isinstance(new, nn.Sequential):  # a fused pair: the new module, then Identity slots
                    mods = list(new)
                else:
                    mods = [new]
                for slot, m in zip(c.slots, mods):
                    setattr(c.parent, slot, m)
                self.report.replaced.append(Replacement(c.name, c.rule, c.old, label))
                self.units.append(c.qualnames)
                return True
            misses.append(f"{label}: {why}")
        self.left(c, "did not match", "; ".join(misses))
        return False

    def walk(self, module: nn.Module, prefix: str) -> None:
        done: set[str] = set()
        if isinstance(module, nn.Sequential):
            keys = list(module._modules)
            i = 0
            while i + 1 < len(keys):
                c = linear_act_candidate(module, i, prefix)
                if c is not None and self.try_candidate(c):
                    done.update(keys[i : i + 2])
                    i += 2
                else:
                    i += 1
        for slot, child in list(module._modules.items()):
            if child is None or slot in done or isinstance(child, TORCHFAST_MODULES):
                continue
            qualname = prefix + slot
            for rule in (known_candidate, gated_mlp_candidate, plain_linear_candidate, user_candidate):
                c = rule(module, slot, qualname, child)
                if c is not None:
                    break
            if c is not None and self.try_candidate(c):
                continue
            self.walk(child, qualname + ".")


def optimize(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    inplace: bool = False,
    verify: bool = True,
    example_inputs=None,
) -> tuple[nn.Module, OptimizeReport]:
    """Replace the parts of `model` that torchfast computes faster; return (model, report).

    What is replaced (by setattr on the parent module; each only when the probe below matches):
      - nn.SiLU -> torchfast.nn.Swish, nn.GELU -> torchfast.nn.GELU, nn.LayerNorm / nn.RMSNorm -> the
        torchfast modules;
      - an nn.Linear directly followed by nn.SiLU / nn.GELU / nn.ReLU (or a user activation that
        matches) inside an nn.Sequential -> torchfast.nn.Linear(activation=...) and nn.Identity in the
        activation's slot, so indices and state_dict keys stay;
      - a module with nn.Linear children named gate_proj/up_proj/down_proj (or w1/w3/w2, gate/up/down,
        wi_0/wi_1/wo) and no other state -> torchfast.nn.SwiGLU / GeGLU (or a GatedMLP keeping the
        names), whichever matches;
      - a float32 CPU nn.Linear not fused with anything -> torchfast.nn.Linear, only where oneDNN's
        GEMM is the faster one on this CPU (torchfast.ops.linear.cpu_matmul_backend() == "onednn");
      - user-defined leaf modules by what they compute: stateless ones against swish, gelu and gelu
        tanh; ones with a `weight` (and `bias`) and an epsilon attribute (variance_epsilon, eps, ...)
        against RMSNorm (LayerNorm).
    The probe runs the original and the candidate on random inputs of two shapes in float32, bfloat16
    and the model's dtype, and compares outputs, input gradients and parameter gradients within the
    tolerance table of torchfast.testing (see torchfast/_optimize/_compare.py). Replacements share
    the original parameter objects, so state_dict keys and values are unchanged.

    Args:
        model: any nn.Module (optimize before wrapping it in DistributedDataParallel).
        include: glob patterns of qualified module names, or rule names (torchfast._optimize.RULES:
            silu, gelu, layer_norm, rms_norm, linear_act, gated_mlp, activation, linear); when given, only
            matching candidates are considered. A fused pair matches by either of its names.
        exclude: the same kinds of patterns; matching candidates are left alone (reported "excluded").
        inplace: modify `model` itself; by default a deep copy is optimized and `model` is untouched.
        verify: check the optimized model against the original on `example_inputs` (or inputs built
            from the first layer, see below), in eval mode, forward and backward (gradients of the
            inputs and of every parameter); raise OptimizeVerificationError naming the first replaced
            module that disagrees. When no inputs can be built, verification is reported "skipped".
        example_inputs: a Tensor or tuple of positional inputs for verify.

    Returns (optimized model, OptimizeReport). Raises TypeError for a model that is not an nn.Module or
    is wrapped in DistributedDataParallel, and OptimizeVerificationError as above.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"torchfast.optimize: argument 'model' must be a torch.nn.Module, got {type(model).__name__}"
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            "torchfast.optimize: argument 'model' is wrapped in "
            f"{type(model).__name__}; optimize the module before wrapping it "
            "(optimize(model) then DistributedDataParallel(optimized))"
        )
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            "torchfast.optimize: argument 'example_inputs' must be a Tensor or a tuple of the "
            f"model's positional inputs, got {type(example_inputs).__name__}"
        )
    original = model
    if inplace:
        original = deepcopy_module(model) if verify else None
    else:
        model = deepcopy_module(model)
    position = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    dtype, device = model_dtype_device(model)
    dtypes = list(dict.fromkeys([torch.float32, torch.bfloat16, dtype]))
    opt = _Optimizer(model, include, exclude, dtypes, device)
    if isinstance(model, TORCHFAST_MODULES):
        pass
    else:
        top = known_candidate(None, "", "", model) or gated_mlp_candidate(None, "", "", model)
        if top is not None:  # the model itself is one replaceable module: there is no parent to set
            model = _replace_root(opt, top, model)
        else:
            opt.walk(model, "")
    report = opt.report
    # The report in the order of the module tree (Sequential pairs are probed before their parent's
    # other children, so the order of discovery is not it).
    order = {tuple(u): position.get(u[0], -1) for u in opt.units}
    pairs = sorted(zip(opt.units, report.replaced), key=lambda p: order[tuple(p[0])])
    opt.units, report.replaced = [u for u, _ in pairs], [r for _, r in pairs]
    report.left_alone.sort(key=lambda s: position.get(s.name.split(" + ")[0], -1))
    if not verify:
        return model, report
    if not report.replaced:  # before building inputs: nothing to run the model for
        report.verification, report.verification_detail = "passed", "nothing was replaced"
        return model, report
    inputs = tuple(example_inputs) if example_inputs is not None else None
    why = ""
    if inputs is None:
        inputs, why = infer_inputs(original)
    if inputs is None:
        report.verification, report.verification_detail = "skipped", why
        return model, report
    with eval_mode(original, model):
        why, worst = check(original, model, inputs, VERIFY_SCALE)
        if why:
            found = locate(original, model, inputs, opt.units)
            report.verification = "failed"
            if found is None:
                raise OptimizeVerificationError(
                    f"torchfast.optimize: the optimized model disagrees with the original ({why}), although "
                    "each replaced module matches on its own inputs: the differences add up across the "
                    "model. Exclude some replacements (exclude=...) or pass verify=False.",
                    None,
                )
            names, unit_why = found
            rep = report.replaced[opt.units.index(names)]
            raise OptimizeVerificationError(
                f"torchfast.optimize: module '{rep.name}' ({rep.old} -> {rep.new}) disagrees with the "
                f"original on the inputs it gets in this model: {unit_why}. It matched on the probe inputs, "
                f"so its behaviour depends on its input; keep the original with exclude=[{rep.name!r}].",
                rep.name,
            )
    shapes = ", ".join(str(list(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    report.verification = "passed"
    report.verification_detail = f"inputs {shapes}, forward and backward, max abs output error {worst:.2g}"
    return model, report


def _replace_root(opt: _Optimizer, c: Candidate, model: nn.Module) -> nn.Module:
    """The model is itself e.g. an nn.SiLU or a gated MLP: the replacement is returned, not set."""
    holder = nn.Module()
    holder.add_module("root", model)
    c.parent, c.slots = holder, ["root"]
    c.qualnames = [""]
    opt.try_candidate(c)
    return holder.root
