"""optimize(verify=True): the whole optimized model against the original, forward and backward, and
on a failure the first replaced module (in execution order) that disagrees on its real inputs."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from torchfast._optimize._compare import GRAD_SCALE, LOW, compare, float_tensors, run_fwd_bwd
from torchfast._util import eval_mode

VERIFY_SEED = 1234
# A whole model chains many ops, each off by up to one rounding: allow 10x the per-op table.
VERIFY_SCALE = 10.0


class OptimizeVerificationError(AssertionError):
    """The optimized model disagrees with the original; `module` is the qualified name of the first
    replaced module that does (None when each one matches alone and only the whole model differs)."""

    def __init__(self, message: str, module: str | None):
        super().__init__(message)
        self.module = module


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def infer_inputs(model: nn.Module) -> tuple[tuple | None, str]:
    """Example inputs built from the first module with parameters (an Embedding takes token ids, a
    Linear or a norm of width H takes (2, 8, H) or (2, H), a ConvNd takes (2, C, 16...)) that the model
    runs on; (None, why) when none runs."""
    dtype, device = model_dtype_device(model)
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    tries: list[torch.Tensor] = []
    if isinstance(first, nn.Embedding):
        tries = [torch.randint(0, first.num_embeddings, (2, 8), generator=gen)]
    elif isinstance(first, nn.Linear):
        tries = [
            torch.randn(2, 8, first.in_features, generator=gen),
            torch.randn(2, first.in_features, generator=gen),
        ]
    elif isinstance(first, nn.modules.conv._ConvNd):
        nd = len(first.kernel_size)
        tries = [torch.randn(2, first.in_channels, *([16 if nd < 3 else 8] * nd), generator=gen)]
    elif isinstance(getattr(first, "embed_dim", None), int):  # nn.MultiheadAttention and its kin
        tries = [torch.randn(2, 8, first.embed_dim, generator=gen)]
    elif first is not None and getattr(first, "weight", None) is not None and first.weight.dim() >= 1:
        shape = tuple(first.weight.shape)
        tries = [torch.randn(2, 8, *shape, generator=gen), torch.randn(2, *shape, generator=gen)]
    if not tries:
        return None, "cannot guess the model's inputs; pass example_inputs="
    errors = []
    for x in tries:
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        try:
            with torch.no_grad(), eval_mode(model):
                model(x)
            return (x,), ""
        except Exception as e:  # noqa: BLE001 (try the next guess)
            errors.append(f"{list(x.shape)}: {type(e).__name__}")
    return None, f"the model ran on none of the guessed inputs ({'; '.join(errors)}); pass example_inputs="


class _Call(nn.Module):
    """module(*args, **kwargs) with fixed keyword arguments, as a module (parameters under 'm.')."""

    def __init__(self, m: nn.Module, kwargs: dict):
        super().__init__()
        self.m, self.kwargs = m, kwargs

    def forward(self, *args):
        return self.m(*args, **self.kwargs)


def _as_float(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def check(original: nn.Module, new: nn.Module, inputs: Sequence, scale: float) -> tuple[str | None, float]:
    """(first difference or None, largest output error) of `new` vs `original` on `inputs`, forward,
    input gradients and parameter gradients (by name). Low-precision models are measured against the
    original in float32, and may be as far from it as the original itself (see _compare)."""
    dtype, _ = model_dtype_device(original)
    if not any(True for _ in original.parameters()):
        dtype = next(
            (x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()), dtype
        )
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    with torch.no_grad():
        shapes = [o.shape for o in float_tensors(original(*inputs))]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    out_o, gin_o, gp_o = run_fwd_bwd(original, inputs, grads)
    out_n, gin_n, gp_n = run_fwd_bwd(new, inputs, grads)
    base = None
    if dtype in LOW:
        ref = copy.deepcopy(original).float()
        base = (out_o, gin_o, gp_o)
        out_o, gin_o, gp_o = run_fwd_bwd(ref, [_as_float(x, torch.float32) for x in inputs], grads)
    if len(out_n) != len(out_o):
        return f"{len(out_n)} outputs vs the original's {len(out_o)}", float("inf")
    worst = 0.0
    pairs = [(f"output {i}", n, o, base and base[0][i], scale) for i, (n, o) in enumerate(zip(out_n, out_o))]
    pairs += [
        (f"gradient of input {i}", n, o, base and base[1][i], scale * GRAD_SCALE)
        for i, (n, o) in enumerate(zip(gin_n, gin_o))
        if n is not None and o is not None
    ]
    pairs += [
        (f"gradient of {k}", gp_n.get(k), o, base and base[2].get(k), scale * GRAD_SCALE)
        for k, o in gp_o.items()
        if o is not None and gp_n.get(k) is not None
    ]
    missing = sorted(set(gp_o) ^ set(gp_n))
    if missing:
        return f"parameters differ: {missing}", float("inf")
    for what, n, o, b, s in pairs:
        bad = compare(n, o, dtype, what, scale=s, baseline=b)
        if what.startswith("output"):
            worst = max(
                worst,
                float((n.detach().double() - o.detach().double().to(n.device)).abs().max())
                if n.numel()
                else 0.0,
            )
        if bad:
            return str(bad), worst
    return None, worst


def locate(
    original: nn.Module, optimized: nn.Module, inputs: Sequence, units: list[list[str]]
) -> tuple[list[str], str] | None:
    """The first replaced unit (qualified names, in execution order) whose replacement disagrees with
    the original on the inputs it receives in the original model."""
    seen: dict[str, tuple] = {}
    order: list[str] = []
    handles = []
    for names in units:
        first = names[0]

        def pre(mod, args, kwargs, first=first):
            if first not in seen:
                seen[first] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)
                order.append(first)

        handles.append(original.get_submodule(first).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            original(*inputs)
    finally:
        for h in handles:
            h.remove()
    by_first = {names[0]: names for names in units}
    for first in order:
        names = by_first[first]
        args, kwargs = seen[first]
        units_on = []
        for model in (original, optimized):
            mods = [model.get_submodule(n) for n in names]
            units_on.append(_Call(mods[0] if len(mods) == 1 else nn.Sequential(*mods), kwargs))
        why, _ = check(*units_on, args, VERIFY_SCALE)
        if why:
            return names, why
    return None
