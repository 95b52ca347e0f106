"""torchfast.transformers: make a loaded Hugging Face transformers model run torchfast's kernels.

    from torchfast.transformers import patch, unpatch
    report = patch(model)      # in place; print(report) says what was replaced, and how, and what not
    unpatch(model)             # back to transformers' own code

Needs the optional dependency `transformers` (5.x; extra `hf`). The parts transformers marks for kernel
swapping (`@use_kernel_forward_from_hub("RMSNorm")` norms, `@use_kernelized_func(apply_rotary_pos_emb)`
attentions) are swapped by the `kernels` package's `kernelize` with a layer mapping whose repositories
are torchfast's own local layers (torchfast/transformers/_layers.py). The parts it has no hook for (the
MLPs, Gemma's `1 + weight` RMSNorm, nn.LayerNorm, the loss) get a forward bound to the module instance,
exactly as kernelize binds its layers; an attention that calls its module's `apply_rotary_pos_emb`
without a hook (Phi-3) gets a copy of its class's forward that sees torchfast's function under that
name (_rebind.py). No class and no module-level function is changed: a second model of the same class
computes as before. docs/transformers.md says which part goes which way and why.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from torchfast._optimize._rules import MIN_LINEAR_WEIGHT
from torchfast.ops.linear import cpu_matmul_backend
from torchfast.ops.rope import rope_cache
from torchfast.transformers import _layers, _rebind
from torchfast.transformers._loss import causal_lm_forward
from torchfast.transformers._report import LeftAsIs, Patched, PatchReport

__all__ = ["PARTS", "SUPPORTED", "LeftAsIs", "PatchReport", "Patched", "is_patched", "patch", "unpatch"]

PARTS = ("rms_norm", "layer_norm", "mlp", "rope", "linear", "loss")
# Causal LMs whose forward torchfast knows (base model -> lm_head -> [softcap] -> ForCausalLMLoss), so the
# loss can be computed from the hidden states. Norms, MLPs and rotary of other models are still found
# by what they compute.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Gemma2ForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel")
_STATE = "_torchfast_patch"  # instance attribute: what patch did, for unpatch
_DEVICES = ("cpu", "cuda")


def _kernels():
    """The `kernels` package, or None when it is not installed (transformers then has no hooks)."""
    try:
        return importlib.import_module("kernels")
    except ImportError:
        return None


class _LocalRepository:
    """A repository in the sense of kernels' layer mappings (anything with load() -> layer class):
    torchfast's layer, already imported, instead of one downloaded from the Hub."""

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer
        self.layer_name = layer.__name__

    def load(self) -> type[nn.Module]:
        return self.layer

    def __eq__(self, other):
        return isinstance(other, _LocalRepository) and other.layer is self.layer

    def __hash__(self):
        return hash(self.layer)

    def __str__(self):
        return f"torchfast layer {self.layer.__module__}.{self.layer.__qualname__}"


_HOOKS = {"RMSNorm": _layers.RMSNormLayer, "rotary_pos_emb": _layers.RotaryLayer}


@contextlib.contextmanager
def _quiet_kernels():
    """kernelize logs a warning per layer it leaves alone; patch reports those itself."""
    log = logging.getLogger("kernels")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _kernelize(kernels, target: nn.Module, hooks: dict, device: torch.device) -> None:
    """kernels.kernelize of `target` alone with `hooks` ({hook name: layer}, empty to restore the
    original forwards). Every hook of the model's classes is in the mapping or falls back to its own
    forward, so only what is passed here changes."""
    dev = "cuda" if device.type == "cuda" else device.type
    mapping = {name: {dev: _LocalRepository(layer)} for name, layer in hooks.items()}
    with _quiet_kernels(), kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(target, mode=kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE, device=dev,
                          use_fallback=True)


def _func_holder(func: nn.Module) -> nn.Module:
    """A bare module holding one `use_kernelized_func` wrapper, so that kernelize reaches that wrapper
    and nothing else of its attention module (whose children may hold other hooks)."""
    holder = nn.Module()
    holder.__dict__["_kernel_funcs"] = {"fn": func}
    return holder


# ---- probes: a part is replaced only where torchfast computes what the module computes ----------------

def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)  # private: patch never moves the user's random stream


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
    same = a.shape == b.shape and a.dtype == b.dtype
    return same and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _same(module: nn.Module, forward, *inputs) -> bool:
    """Whether `forward` bound to `module` matches the class's own forward on `inputs` (no grad, eval)."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = type(module).forward(module, *inputs)
            got = forward(module, *inputs)
    finally:
        module.train(training)
    if isinstance(want, tuple):
        return all(_close(w, g) for w, g in zip(want, got))
    return _close(want, got)


def _param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _rows(module: nn.Module, width: int) -> torch.Tensor:
    p = _param(module)
    return (torch.randn(2, 3, width, generator=_gen()) * 2 + 0.5).to(p.device, p.dtype)


def _activation(act: nn.Module, device, dtype) -> str | None:
    """Which torchfast glu activation `act` computes: swish, gelu_tanh or gelu (found by running it)."""
    x = (torch.randn(64, generator=_gen()) * 3).to(device, dtype)
    with torch.no_grad():
        y = act(x)
        for name, ref in (("swish", F.silu(x)), ("gelu_tanh", F.gelu(x, approximate="tanh")),
                          ("gelu", F.gelu(x))):
            if _close(y, ref):
                return name
    return None


_ROTARY = "apply_rotary_pos_emb"


def _code_names(fn) -> tuple[str, ...]:
    """The global names the function's own code uses (under functools.wraps decorators)."""
    names: tuple[str, ...] = ()
    while fn is not None:
        code = getattr(fn, "__code__", None)
        names += code.co_names if code is not None else ()
        fn = getattr(fn, "__wrapped__", None)
    return names


def _head_dim(m: nn.Module) -> int | None:
    head = getattr(m, "head_dim", None)
    return head if isinstance(head, int) and head > 0 and head % 2 == 0 else None


def _rotary_width(m: nn.Module, head: int) -> int:
    """The rotated width of each head: head_dim * partial_rotary_factor (transformers keeps the factor
    in config.rope_parameters, older configs as an attribute), rounded down to even."""
    config = getattr(m, "config", None)
    params = getattr(config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", 1.0)
    width = int(head * float(factor)) // 2 * 2
    return width if 0 < width <= head else head


def _rope_matches(func, m: nn.Module, widths) -> bool:
    """Whether func(q, k, cos, sin) equals torchfast.rope on GQA-shaped random q, k for each rotary width
    (cos/sin narrower than the head: partial rotary). A function that fails on such input does not match."""
    p = _param(m)
    head = max(widths)
    g = _gen()
    q = torch.randn(1, 2, 5, head, generator=g).to(p.device, p.dtype)
    k = torch.randn(1, 1, 5, head, generator=g).to(p.device, p.dtype)
    for width in widths:
        cos, sin = (t.to(p.device, p.dtype) for t in rope_cache(torch.arange(5)[None], width))
        try:
            with torch.no_grad():
                want, got = func(q, k, cos, sin), _layers.apply_rotary_pos_emb(q, k, cos, sin)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return False
        if not all(_close(w, h) for w, h in zip(want, got)):
            return False
    return True


# ---- finding the parts ------------------------------------------------------------------------------

def _has(m: nn.Module, kind, *names: str) -> bool:
    """Whether m has children `names` of class `kind` (a class, or a class name: transformers' Conv1D)."""
    children = [getattr(m, n, None) for n in names]
    if isinstance(kind, str):
        return all(type(c).__name__ == kind for c in children)
    return all(isinstance(c, kind) for c in children)


class _Plan:
    def __init__(self, model: nn.Module, exclude: tuple[str, ...], kernels):
        self.model, self.exclude, self.kernels = model, exclude, kernels
        self.report = PatchReport(model=type(model).__name__,
                                  kernels=f"kernels {kernels.__version__}" if kernels else
                                  "kernels not installed: hooked parts bound by torchfast instead")
        self.hooked: list[tuple[str, nn.Module, dict]] = []   # (name, kernelize target, hooks)
        self.bound: list[tuple[str, nn.Module, object]] = []  # (name, module, forward function)
        self.fused_projections: set[str] = set()  # the Linears of the MLPs replaced (torchfast.ops.linear)

    def excluded(self, name: str, part: str, old: str) -> bool:
        if part in self.exclude:
            self.report.left_alone.append(LeftAsIs(name, part, old, "excluded"))
            return True
        return False

    def replace(self, name, module, part, how_hook, forward, new):
        """Through kernels when `how_hook` names a hook of the module's class and kernels is there."""
        old = type(module).__name__
        if how_hook and self.kernels is not None:
            self.hooked.append((name, module, {how_hook: forward}))
            how = f"kernels.kernelize (hook {how_hook!r})"
        else:
            fn = forward.forward if isinstance(forward, type) else forward
            self.bound.append((name, module, fn))
            how = "instance forward"
        self.report.replaced.append(Patched(name, part, old, how, new))

    def left(self, name, part, old, reason):
        self.report.left_alone.append(LeftAsIs(name, part, old, reason))

    def norm(self, name: str, m: nn.Module) -> None:
        old = type(m).__name__
        if self.excluded(name, "rms_norm", old):
            return
        hook = "RMSNorm" if getattr(type(m), "kernel_layer_name", None) == "RMSNorm" else None
        x = _rows(m, m.weight.shape[-1])
        if _same(m, _layers.RMSNormLayer.forward, x):
            self.replace(name, m, "rms_norm", hook, _layers.RMSNormLayer, "torchfast.rms_norm")
        elif _same(m, _layers.offset_rms_norm_forward, x):
            self.replace(name, m, "rms_norm", None, _layers.offset_rms_norm_forward,
                         "torchfast.rms_norm (weight 1 + w)")
        else:
            self.left(name, "rms_norm", old, "does not compute weight * x / rms(x) nor (1 + weight) * ...")

    def layer_norm(self, name: str, m: nn.LayerNorm) -> None:
        if self.excluded(name, "layer_norm", "nn.LayerNorm"):
            return
        if len(m.normalized_shape) != 1 or not m.elementwise_affine:
            self.left(name, "layer_norm", "nn.LayerNorm", "not a 1-D affine LayerNorm")
        else:
            self.replace(name, m, "layer_norm", None, _layers.layer_norm_forward, "torchfast.layer_norm")

    def mlp(self, name: str, m: nn.Module, kind: str, act_module: nn.Module) -> None:
        old = type(m).__name__
        if self.excluded(name, "mlp", old):
            return
        p = _param(m)
        act = _activation(act_module, p.device, p.dtype)
        if act is None:
            self.left(name, "mlp", old,
                      f"activation {type(act_module).__name__} is not swish, gelu or gelu tanh")
            return
        make = {"gated": _layers.gated_mlp_forward, "packed": _layers.packed_mlp_forward,
                "conv1d": _layers.conv1d_mlp_forward}[kind]
        forward = make(act)
        first = {"gated": "gate_proj", "packed": "gate_up_proj", "conv1d": "c_fc"}[kind]
        width = getattr(m, first).weight.shape[0 if kind == "conv1d" else 1]  # Conv1D's weight: [in, out]
        if _same(m, forward, _rows(m, width)):
            new = {"conv1d": f"torchfast.bias_act({act!r})"}.get(kind, f"torchfast glu ({act}) + down_proj")
            self.replace(name, m, "mlp", None, forward, new)
            self.fused_projections.update(f"{name}.{child}" for child in ("gate_proj", "up_proj", "gate_up_proj",
                                                                          "down_proj"))
        else:
            self.left(name, "mlp", old, "its forward does not compute the gated (or plain) MLP torchfast has")

    def rotary(self, name: str, m: nn.Module) -> None:
        old = type(m).__name__
        funcs = {k: f for k, f in getattr(m, "_kernel_funcs", {}).items()
                 if getattr(type(f), "kernel_layer_name", None) == "rotary_pos_emb"}
        if not funcs:
            self.module_level_rotary(name, m)
            return
        head = self.rotary_head(name, m, old)
        if head is None:
            return
        for key, func in funcs.items():
            if not _rope_matches(func, m, (head,)):
                self.left(name, "rope", old, f"{key} does not compute transformers' rotate-half rotation")
                continue
            if self.kernels is not None:
                self.hooked.append((name, _func_holder(func), {"rotary_pos_emb": _layers.RotaryLayer}))
                how = "kernels.kernelize (hook 'rotary_pos_emb')"
            else:  # the wrapper exists but kernels cannot be imported: bind its forward as kernelize would
                self.bound.append((name, func, _layers.RotaryLayer.forward))
                how = "instance forward"
            self.report.replaced.append(Patched(name, "rope", old, how, "torchfast.rope"))

    def rotary_head(self, name: str, m: nn.Module, old: str) -> int | None:
        """The attention's head_dim when its rotary is to be fused, else None (excluded, or a head_dim
        the rotation cannot take, which the report says)."""
        if self.excluded(name, "rope", old):
            return None
        head = _head_dim(m)
        if head is None:
            self.left(name, "rope", old, f"head_dim {getattr(m, 'head_dim', None)!r} is not an even int")
        return head

    def module_level_rotary(self, name: str, m: nn.Module) -> None:
        """An attention whose forward calls its module's `apply_rotary_pos_emb` directly (no kernel hook:
        Phi-3): its instance gets a copy of the class's forward that sees torchfast's function under that
        name (torchfast/transformers/_rebind.py says why this way)."""
        old = type(m).__name__
        cls_forward = type(m).forward
        namespace = getattr(sys.modules.get(type(m).__module__), "__dict__", {})
        original = namespace.get(_ROTARY)
        if not callable(original) or _ROTARY not in _code_names(cls_forward):
            return  # no rotary here (GPT-2's attention, a bidirectional encoder's...)
        head = self.rotary_head(name, m, old)
        if head is None:
            return
        widths = {head, _rotary_width(m, head)}
        if not _rope_matches(original, m, sorted(widths)):
            self.left(name, "rope", old, f"its module's {_ROTARY} does not compute the rotate-half rotation "
                                         f"(rotary widths {sorted(widths)})")
            return
        try:
            forward = _rebind.with_global(cls_forward, namespace, _ROTARY, _layers.apply_rotary_pos_emb)
        except _rebind.CannotRebind as e:
            self.left(name, "rope", old, f"no kernel hook, and its forward cannot be copied: {e}")
            return
        self.bound.append((name, m, forward))
        self.report.replaced.append(Patched(name, "rope", old, f"instance forward (module-level {_ROTARY})",
                                            "torchfast.rope"))

    def linear(self, name: str, m: nn.Linear) -> None:
        """A float32 CPU nn.Linear (attention projections, lm_head in eval, any other) through
        torchfast.ops.linear: oneDNN's GEMMs where that is the faster library here. Offered under the
        conditions of torchfast.optimize's "linear" rule (backend oneDNN, weight >= 256 x 256), since
        elsewhere the forward would be F.linear again; the MLP projections patch fuses already call it."""
        w = m.weight
        if cpu_matmul_backend() != "onednn" or not isinstance(w, torch.Tensor):
            return
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.numel() < MIN_LINEAR_WEIGHT:
            return
        if self.excluded(name, "linear", "nn.Linear"):
            return
        if any(p is not None and type(p) is not nn.Parameter for p in (m.weight, m.bias)):
            self.left(name, "linear", "nn.Linear", "its weight is not a plain Parameter (quantized or wrapped)")
            return
        self.replace(name, m, "linear", None, _layers.linear_forward, "torchfast.ops.linear (oneDNN GEMMs)")

    def loss(self) -> None:
        model = self.model
        old = type(model).__name__
        if self.excluded("", "loss", old):
            return
        if old not in SUPPORTED:
            self.left("", "loss", old, "torchfast knows the forward of " + ", ".join(SUPPORTED) + " only")
            return
        head = model.get_output_embeddings()
        loss_fn = getattr(model, "loss_function", None)
        if type(head) is not nn.Linear:
            self.left("", "loss", old, f"output embeddings are {type(head).__name__}, not nn.Linear")
        elif getattr(loss_fn, "__name__", "") != "ForCausalLMLoss":
            self.left("", "loss", old,
                      f"loss_function is {getattr(loss_fn, '__name__', loss_fn)}, not ForCausalLMLoss")
        else:
            self.bound.append(("", model, causal_lm_forward(type(model).forward)))
            self.report.replaced.append(Patched("", "loss", old, "instance forward",
                                                "torchfast.linear_cross_entropy (training with labels)"))

    def walk(self) -> None:
        for name, m in self.model.named_modules():
            cls = type(m).__name__
            if isinstance(m, nn.LayerNorm) and type(m) is nn.LayerNorm:
                self.layer_norm(name, m)
            elif cls.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter):
                self.norm(name, m)
            elif _has(m, nn.Linear, "gate_proj", "up_proj", "down_proj") and _has(m, nn.Module, "act_fn"):
                self.mlp(name, m, "gated", m.act_fn)
            elif _has(m, nn.Linear, "gate_up_proj", "down_proj") and _has(m, nn.Module, "activation_fn"):
                self.mlp(name, m, "packed", m.activation_fn)
            elif _has(m, "Conv1D", "c_fc", "c_proj") and _has(m, nn.Module, "act"):
                self.mlp(name, m, "conv1d", m.act)
            elif cls.endswith("Attention"):
                self.rotary(name, m)
            if type(m) is nn.Linear and name not in self.fused_projections:
                self.linear(name, m)
        self.loss()


def patch(model: nn.Module, *, exclude=()) -> PatchReport:
    """Make a transformers model compute with torchfast's kernels, in place; return what was done.

    Replaced, where the module computes what torchfast does (each candidate is run once on a small
    random input against its own forward, in no-grad eval mode, before it is replaced):
      - rms_norm: RMSNorm layers, y = weight * x / sqrt(mean(x^2) + eps), and Gemma's
        (1 + weight) * ... form;
      - layer_norm: nn.LayerNorm (GPT-2);
      - mlp: down_proj(act(gate_proj(x)) * up_proj(x)) with act swish, gelu or gelu tanh (Llama,
        Mistral, Qwen2/3, Gemma 2), Phi-3's packed gate_up_proj, GPT-2's c_fc -> act -> c_proj;
      - rope: `apply_rotary_pos_emb(q, k, cos, sin)` of attentions transformers marks with
        `@use_kernelized_func`, and of attentions whose forward calls their module's function with no
        hook (Phi-3, partial rotary included): for those the instance gets a copy of the class's
        forward whose global `apply_rotary_pos_emb` is torchfast's;
      - linear: the other float32 CPU nn.Linear layers with weights of at least 256 x 256 (attention
        projections; lm_head when it runs, in eval) call torchfast.ops.linear, only where
        `torchfast.ops.linear.cpu_matmul_backend()` is "onednn" (AMD CPUs: oneDNN's float32 GEMMs are
        the faster ones there); their weights, hooks and state_dict stay as they are;
      - loss: in training mode with labels, the causal LM's loss is
        linear_cross_entropy(last hidden state, lm_head.weight, labels shifted by one, ignore -100,
        softcap=final_logit_softcapping) (divided by num_items_in_batch when given, as transformers'
        ForCausalLMLoss), and the output's `logits` is None: the [tokens, vocab] logits are never built.
        In eval mode or without labels the class's own forward runs. Only for the classes in SUPPORTED.
    Parts with a transformers kernel hook go through `kernels.kernelize` with torchfast's local layers;
    the others get a forward bound to the instance. Parameters, buffers, state_dict and config are
    untouched; other instances of the same classes are unaffected. Patching a patched model first
    undoes the earlier patch.

    Args:
        model: a transformers PreTrainedModel (any nn.Module is walked, but only modules that look like
            the parts above are considered), on CPU or CUDA.
        exclude: part names (a string or an iterable of them, from PARTS) to leave as they are.
    Returns a PatchReport (`print(report)` for the table). Raises TypeError for a model that is not an
    nn.Module, and ValueError for an unknown part name or a model on another device type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"torchfast.transformers.patch: argument 'model' must be a torch.nn.Module "
                        f"(a transformers model), got {type(model).__name__}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    unknown = [p for p in exclude if p not in PARTS]
    if unknown:
        raise ValueError(f"torchfast.transformers.patch: argument 'exclude' has unknown parts {unknown}; "
                         f"the parts are {', '.join(PARTS)}")
    try:
        device = _param(model).device
    except StopIteration:
        raise ValueError("torchfast.transformers.patch: argument 'model' has no parameters") from None
    if device.type not in _DEVICES:
        raise ValueError(f"torchfast.transformers.patch: the model is on {device.type}; torchfast's kernels "
                         f"run on {' and '.join(_DEVICES)}")
    if is_patched(model):
        unpatch(model)
    kernels = _kernels()
    plan = _Plan(model, exclude, kernels)
    plan.walk()
    state = {"hooked": [], "bound": [], "device": device}
    for name, target, hooks in plan.hooked:
        _kernelize(kernels, target, hooks, device)
        state["hooked"].append(target)
    for name, module, fn in plan.bound:
        module.forward = MethodType(fn, module)
        state["bound"].append(module)
    model.__dict__[_STATE] = state
    return plan.report


def is_patched(model: nn.Module) -> bool:
    """Whether `model` was patched by torchfast.transformers.patch (and not unpatched since)."""
    return _STATE in getattr(model, "__dict__", {})


def unpatch(model: nn.Module) -> None:
    """Undo torchfast.transformers.patch: every replaced module runs its class's forward again (the
    kernelized ones through kernels.kernelize with an empty mapping, which restores their own forward).
    A model that was not patched is left as it is."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    kernels = _kernels()
    for target in state["hooked"]:
        _kernelize(kernels, target, {}, state["device"])
    for module in state["bound"]:
        module.__dict__.pop("forward", None)
