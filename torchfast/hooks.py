"""Looking inside a model through hooks, on torchfast modules and torch.nn modules alike.

    with torchfast.hooks.ActivationStats(model) as acts:
        model(x)
    acts.summary()                                    # a table: shape, dtype, mean, std, min, max, ...
    with torchfast.hooks.GradientStats(model) as grads:
        model(x).sum().backward()
    grads.param_norms["0.weight"], grads.module_grads["0"]
    with torchfast.hooks.NonFiniteDetector(model):   # raises NonFiniteError naming the first bad module
        ...
    with torchfast.hooks.capture(model, ["0", "2"]) as out:
        model(x)
    out["0"]                                          # the activation of submodule "0"

Every class registers its hooks on entering the `with` block (or `attach()`) and removes every handle
on leaving it (or `remove()`), so a model carries no hooks afterwards.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

HISTOGRAM_SAMPLES = 4096


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _select(model: nn.Module, modules: Iterable[str] | None, who: str) -> dict[str, nn.Module]:
    """Named submodules: the given qualified names (all must exist), or by default every leaf module
    (one without children), or the model itself when it has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"torchfast.hooks.{who}: model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if modules is None:
        leaves = {n: m for n, m in named.items() if n and not any(True for _ in m.children())}
        return leaves or {"": model}
    if isinstance(modules, str):
        modules = [modules]
    names = list(modules)
    unknown = [n for n in names if n not in named]
    if unknown:
        known = ", ".join(repr(n) for n in list(named)[:20])
        raise ValueError(
            f"torchfast.hooks.{who}: no submodule named {unknown}; the model has {known}"
            + (" ..." if len(named) > 20 else "")
        )
    return {n: named[n] for n in names}


class _Hooks:
    """Owns the handles; a context manager that attaches on enter and removes all on exit."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def attach(self):
        raise NotImplementedError

    def remove(self) -> None:
        """Remove every hook this object registered (safe to call twice)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class TensorStats:
    """Statistics of one tensor; mean/std/min/max over its finite values (NaN when there are none)."""

    shape: tuple[int, ...]
    dtype: str
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    nonfinite: int


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """TensorStats of `t`, computed in float32 (float64 inputs in float64) without autograd."""
    with torch.no_grad():
        x = t.detach()
        x = x.double() if x.dtype == torch.float64 else x.float()
        n = x.numel()
        finite = torch.isfinite(x)
        nonfinite = int(n - finite.sum().item())
        vals = x[finite] if nonfinite else x.reshape(-1)
        nan = float("nan")
        if vals.numel():
            mean, std = vals.mean().item(), (vals.std().item() if vals.numel() > 1 else 0.0)
            lo, hi = vals.min().item(), vals.max().item()
        else:
            mean = std = lo = hi = nan
        zeros = (x == 0).sum().item() / n if n else nan
    return TensorStats(
        tuple(t.shape), str(t.dtype).removeprefix("torch."), mean, std, lo, hi, zeros, nonfinite
    )


class ActivationStats(_Hooks):
    """Forward hooks recording, per module (qualified name), the statistics of its output (the first
    tensor when it returns several): shape, dtype, mean, std, min, max, fraction of zeros and the count
    of non-finite values. The last call of each module wins. `modules`: qualified names to watch
    (default: every leaf module). Also keeps a strided sample of up to 4096 values per module for
    `log`'s histograms.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None):
        super().__init__()
        self.modules = _select(model, modules, "ActivationStats")
        self.stats: dict[str, TensorStats] = {}
        self._samples: dict[str, torch.Tensor] = {}

    def attach(self) -> ActivationStats:
        """Register the forward hooks (done by `with`)."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None or not (t.is_floating_point() or t.is_complex()):
                return
            self.stats[name] = tensor_stats(t)
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // HISTOGRAM_SAMPLES)
            self._samples[name] = flat[::step][:HISTOGRAM_SAMPLES].float().cpu()

        return hook

    def summary(self, file: TextIO | None = sys.stdout) -> str:
        """The table of recorded statistics, one module per line in execution order; printed to `file`
        (pass None to only get the string back)."""
        head = (
            f"{'module':<24}{'shape':<18}{'dtype':<10}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}"
            f"{'zeros':>8}{'nonfinite':>10}"
        )
        lines = [head]
        for name, s in self.stats.items():
            lines.append(
                f"{name or '(model)':<24}{str(list(s.shape)):<18}{s.dtype:<10}{s.mean:>10.4g}"
                f"{s.std:>10.4g}{s.min:>10.4g}{s.max:>10.4g}{s.zero_fraction:>8.3f}{s.nonfinite:>10}"
            )
        if not self.stats:
            lines.append("(nothing recorded: run a forward pass inside the `with` block)")
        text = "\n".join(lines)
        if file is not None:
            print(text, file=file)
        return text

    def log(self, writer: Any, step: int, prefix: str = "activations") -> None:
        """Write each module's mean, std, zero fraction and non-finite count as TensorBoard scalars
        (`<prefix>/<module>/<stat>`) and its value sample as a histogram, to a SummaryWriter."""
        for name, s in self.stats.items():
            tag = f"{prefix}/{name or 'model'}"
            for key in ("mean", "std", "zero_fraction", "nonfinite"):
                value = getattr(s, key)
                if math.isfinite(value):
                    writer.add_scalar(f"{tag}/{key}", value, step)
            sample = self._samples.get(name)
            if sample is not None and sample.numel() and torch.isfinite(sample).all():
                writer.add_histogram(tag, sample, step)


class GradientStats(_Hooks):
    """Gradient norms, recorded during backward.

    `module_grads[name]`: (norm of the gradient w.r.t. the module's output, norm of the gradient w.r.t.
    its inputs), through `register_full_backward_hook` (the deprecated `register_backward_hook` saw
    only the last op's gradients). `param_norms[name]`: the L2 norm of each parameter's accumulated
    `.grad`, through `register_post_accumulate_grad_hook` (it runs once the gradient is fully
    accumulated, so with gradient accumulation it reports the running sum). Last backward wins.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None):
        super().__init__()
        self.modules = _select(model, modules, "GradientStats")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.module_grads: dict[str, tuple[float, float]] = {}
        self.param_norms: dict[str, float] = {}

    def attach(self) -> GradientStats:
        """Register the hooks (done by `with`)."""
        for name, module in self.modules.items():
            self._handles.append(module.register_full_backward_hook(self._module_hook(name)))
        for name, p in self.params.items():
            self._handles.append(p.register_post_accumulate_grad_hook(self._param_hook(name)))
        return self

    def _module_hook(self, name: str):
        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            self.module_grads[name] = (_norm(grad_output), _norm(grad_input))

        return hook

    def _param_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.param_norms[name] = p.grad.detach().float().norm().item()

        return hook


def _norm(tensors: tuple) -> float:
    ts = [t.detach().float() for t in _tensors(tensors)]
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in ts])).item() if ts else 0.0


class NonFiniteError(FloatingPointError):
    """A module produced NaN or Inf; `module` is its qualified name, `phase` "forward" or "backward",
    `step` the detector's step counter when it happened."""

    def __init__(self, module: str, phase: str, step: int, count: int, total: int):
        self.module, self.phase, self.step = module, phase, step
        what = "output" if phase == "forward" else "input gradient"
        super().__init__(
            f"non-finite values in the {phase} {what} of module {module or '(model)'!r} at "
            f"step {step}: {count} of {total} elements are NaN or Inf"
        )


class NonFiniteDetector(_Hooks):
    """Raises NonFiniteError at the first module, in execution order, whose forward output or backward
    gradient (w.r.t. its inputs) holds NaN or Inf, naming the module and `self.step` (set it, or call
    `next_step()`, each training step). Hooks every module; children run before their parent, so the
    innermost culprit is named. `check_backward=False` watches the forward only (under fp16 loss
    scaling, inf gradients are expected now and then and handled by the GradScaler).
    Checking costs a device sync per module: turn it on to hunt a NaN, not for every run."""

    def __init__(self, model: nn.Module, *, check_backward: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"torchfast.hooks.NonFiniteDetector: model must be an nn.Module, "
                f"got {type(model).__name__}"
            )
        self.modules = dict(model.named_modules())
        self.check_backward = check_backward
        self.step = 0

    def next_step(self) -> None:
        self.step += 1

    def attach(self) -> NonFiniteDetector:
        """Register the hooks (done by `with`)."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._check(name, "forward", 1)))
            if self.check_backward:
                self._handles.append(module.register_full_backward_hook(self._check(name, "backward", 0)))
        return self

    def _check(self, name: str, phase: str, index: int):
        def hook(module: nn.Module, *args: Any) -> None:
            for t in _tensors(args[index]):
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum().item())
                    raise NonFiniteError(name, phase, self.step, bad, t.numel())

        return hook


class capture(_Hooks):  # noqa: N801  (used as a function: `with capture(model, names) as acts`)
    """`with capture(model, ["encoder.0", "head"]) as acts: model(x)`; afterwards `acts["head"]` is that
    module's output from the forward pass (the last call when a module runs several times), detached
    unless `detach=False`. Unknown names raise ValueError listing the model's modules."""

    def __init__(self, model: nn.Module, names: Iterable[str], *, detach: bool = True):
        super().__init__()
        self.modules = _select(model, list(names) if not isinstance(names, str) else [names], "capture")
        self.detach = detach
        self.outputs: dict[str, Any] = {}

    def attach(self) -> dict[str, Any]:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self.outputs

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = (
                output.detach() if self.detach and isinstance(output, torch.Tensor) else output
            )

        return hook

    def __enter__(self) -> dict[str, Any]:  # type: ignore[override]
        return self.attach()


def count_hooks(model: nn.Module) -> int:
    """Hooks registered on `model`, its submodules and its parameters (forward, forward-pre, backward,
    backward-pre and post-accumulate-grad): what the classes above must leave unchanged on exit."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(m._backward_hooks) + len(m._backward_pre_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n
