"""DTensor sharding rules for every torchfast op, forward and backward.

A DTensor (torch.distributed.tensor) holds one shard of a global tensor per rank; to run an op on
DTensors, PyTorch asks a rule which placements of the inputs the op can work on locally and what
placements its outputs then have. Without a rule, a torchfast op on DTensors raises "does not have a
sharding strategy registered". With these rules the tensor-parallel plans run each op on the local
shards with no collective:

- elementwise ops (swish, bias_act, swiglu/geglu and their backward ops): any dimension sharded, as
  long as the inputs share it; bias_act with x sharded on its features takes the bias sharded too
  (ColwiseParallel), and its bias gradient is then sharded, else Partial (a sum over the ranks' rows);
- packed swiglu/geglu ([gate | up] on the last dimension) and the norms (rms_norm, add_rms_norm,
  layer_norm): any dimension but the last (SequenceParallel shards tokens); weight and bias are
  Replicate, and their gradients come out Partial (each rank's sum over its own rows), which DTensor
  reduces when the gradient is used, exactly as for torch.nn's norms;
- rope: q and k sharded on the same dimension (heads under tensor parallelism, tokens under sequence
  parallelism); cos and sin follow on their matching dimension, or stay Replicate where they broadcast;
- cross_entropy and linear_cross_entropy: sharded on token dimensions (not the vocabulary); the
  classifier weight of linear_cross_entropy is Replicate, its gradient Partial. A vocabulary-sharded
  input (loss_parallel's Shard(-1) logits, a ColwiseParallel LM head weight) is refused with an error
  naming the argument: the log-sum-exp would need a cross-rank reduction these kernels do not do, and
  gathering the whole vocabulary silently is what the fused losses exist to avoid.
- every backward op is linear in its incoming gradient, so it also accepts that gradient Partial with
  the other inputs Replicate (the outputs are then Partial).

Every op also accepts all inputs Replicate. Which of the offered placements runs is DTensor's choice:
the one that needs the cheapest redistribution of the inputs (none, when the inputs already match).

Why a module of its own, registered lazily: importing torch.distributed.tensor costs about a second
(measured 1.3-1.5 s on the 2-core development machine, against 0.3 s for all of torchfast). A process
that never imports it never builds a DTensor, so `install()` registers the rules at once when DTensor
is already imported, and otherwise when it is (an import hook that removes itself after one use).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

import torch

_DT = "torch.distributed.tensor"
_RULES: dict[str, tuple[Callable, tuple[str, ...]]] = {}
_registered = False


def is_dtensor(t) -> bool:
    """Whether t is a DTensor, without importing torch.distributed.tensor (no DTensor exists before)."""
    mod = sys.modules.get(_DT)
    return mod is not None and isinstance(t, mod.DTensor)


def _rule(*ops: str, static: tuple[str, ...] = ()):
    """Register `fn` as the single-mesh-dimension rule of the torchfast ops `ops`. fn gets the op's
    arguments (tensors as DTensorSpecs: `.ndim`, `.shape`, `.placements`) and returns a list of
    (output placements, input placements), None for each output or argument that is not a tensor.
    `static`: keyword arguments the rule reads, so DTensor's cache of decisions keys on them."""

    def deco(fn):
        for op in ops:
            _RULES[op] = (fn, static)
        return fn

    return deco


# ---- placements, imported only once DTensor is -------------------------------------------------------

def _p():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard, Replicate(), Partial()


def _opt(t, placement):
    """placement for an optional tensor argument, None when it is absent."""
    return None if t is None else placement


def _replicate_all(n_out: int, args) -> tuple[list, list]:
    """The rule every op has: all n_out outputs and every tensor argument Replicate."""
    _, R, _ = _p()
    return [R] * n_out, [None if not _is_spec(a) else R for a in args]


def _is_spec(a) -> bool:
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    return isinstance(a, DTensorSpec)


def _partial_grad(outs: list, args) -> tuple[list, list]:
    """Backward ops: outputs linear in the incoming gradient (first argument) may take it Partial, with
    every other tensor Replicate; `outs` gives which outputs exist (None: absent)."""
    _, R, P = _p()
    ins = [P] + [R if _is_spec(a) else None for a in args[1:]]
    return [None if o is None else P for o in outs], ins


# ---- elementwise --------------------------------------------------------------------------------------

@_rule("swish")
def _swish(x):
    S, _, _ = _p()
    return [_replicate_all(1, (x,))] + [([S(d)], [S(d)]) for d in range(x.ndim)]


@_rule("swish_backward")
def _swish_backward(grad_out, x):
    S, _, _ = _p()
    return ([_replicate_all(1, (grad_out, x)), _partial_grad([1], (grad_out, x))]
            + [([S(d)], [S(d), S(d)]) for d in range(x.ndim)])


@_rule("swiglu", "geglu")
def _glu(gate, up, approximate="none"):
    S, _, _ = _p()
    return [_replicate_all(1, (gate, up))] + [([S(d)], [S(d), S(d)]) for d in range(gate.ndim)]


@_rule("swiglu_backward", "geglu_backward")
def _glu_backward(grad_out, gate, up, approximate="none"):
    S, _, _ = _p()
    args = (grad_out, gate, up)
    return ([_replicate_all(2, args), _partial_grad([1, 1], args)]
            + [([S(d), S(d)], [S(d)] * 3) for d in range(gate.ndim)])


@_rule("swiglu_packed", "geglu_packed")
def _glu_packed(x, approximate="none"):
    # [gate | up] halves of the last dimension: a shard of it would hold parts of the wrong halves.
    S, _, _ = _p()
    return [_replicate_all(1, (x,))] + [([S(d)], [S(d)]) for d in range(x.ndim - 1)]


@_rule("swiglu_packed_backward", "geglu_packed_backward")
def _glu_packed_backward(grad_out, x, approximate="none"):
    S, _, _ = _p()
    args = (grad_out, x)
    return ([_replicate_all(1, args), _partial_grad([1], args)]
            + [([S(d)], [S(d), S(d)]) for d in range(x.ndim - 1)])


@_rule("bias_act")
def _bias_act(x, bias, act=None):
    S, R, _ = _p()
    last = x.ndim - 1
    rules = [_replicate_all(1, (x, bias))]
    rules += [([S(d)], [S(d), _opt(bias, R)]) for d in range(last)]
    rules.append(([S(last)], [S(last), _opt(bias, S(0))]))  # ColwiseParallel: features sharded
    return rules


@_rule("bias_act_backward")
def _bias_act_backward(grad_out, x, bias, act=None):
    # Without a bias the op returns an empty placeholder for its gradient: Replicate, never reduced.
    S, R, P = _p()
    last = x.ndim - 1
    args = (grad_out, x, bias)
    rules = [_replicate_all(2, args)]
    ps = _partial_grad([1, 1], args)
    rules.append((ps[0] if bias is not None else [P, R], ps[1]))
    rules += [([S(d), P if bias is not None else R], [S(d), S(d), _opt(bias, R)]) for d in range(last)]
    rules.append(([S(last), S(0) if bias is not None else R], [S(last), S(last), _opt(bias, S(0))]))
    return rules


# ---- norms over the last dimension --------------------------------------------------------------------

@_rule("rms_norm")
def _rms_norm(x, weight, eps):
    S, R, _ = _p()
    return [_replicate_all(2, (x, weight, eps))] + [
        ([S(d), S(d)], [S(d), _opt(weight, R), None]) for d in range(x.ndim - 1)]


@_rule("rms_norm_backward")
def _rms_norm_backward(grad_out, x, weight, rstd):
    S, R, P = _p()
    args = (grad_out, x, weight, rstd)
    # dw: each rank's sum over its own rows; the sum over the ranks is the gradient.
    return [([R, _opt(weight, R)], _replicate_all(2, args)[1]), _partial_grad([1, weight], args)] + [
        ([S(d), _opt(weight, P)], [S(d), S(d), _opt(weight, R), S(d)]) for d in range(x.ndim - 1)]


@_rule("add_rms_norm")
def _add_rms_norm(x, residual, weight, eps):
    S, R, _ = _p()
    return [_replicate_all(3, (x, residual, weight, eps))] + [
        ([S(d)] * 3, [S(d), S(d), _opt(weight, R), None]) for d in range(x.ndim - 1)]


@_rule("add_rms_norm_backward")
def _add_rms_norm_backward(grad_out, grad_h, h, weight, rstd):
    S, R, P = _p()
    args = (grad_out, grad_h, h, weight, rstd)
    in_r = _replicate_all(2, args)[1]
    # grad_h is added to dh: Partial only with grad_out Partial too.
    part = ([P, _opt(weight, P)], [P, _opt(grad_h, P), R, _opt(weight, R), R])
    return [([R, _opt(weight, R)], in_r), part] + [
        ([S(d), _opt(weight, P)], [S(d), _opt(grad_h, S(d)), S(d), _opt(weight, R), S(d)])
        for d in range(h.ndim - 1)]


@_rule("layer_norm")
def _layer_norm(x, weight, bias, eps):
    S, R, _ = _p()
    return [_replicate_all(3, (x, weight, bias, eps))] + [
        ([S(d)] * 3, [S(d), _opt(weight, R), _opt(bias, R), None]) for d in range(x.ndim - 1)]


@_rule("layer_norm_backward")
def _layer_norm_backward(grad_out, x, weight, bias, mean, rstd):
    S, R, P = _p()
    args = (grad_out, x, weight, bias, mean, rstd)
    in_r = _replicate_all(3, args)[1]
    return [([R, _opt(weight, R), _opt(bias, R)], in_r),
            _partial_grad([1, weight, bias], args)] + [
        ([S(d), _opt(weight, P), _opt(bias, P)], [S(d), S(d), _opt(weight, R), _opt(bias, R), S(d), S(d)])
        for d in range(x.ndim - 1)]


# ---- rope ---------------------------------------------------------------------------------------------

def _cos_placement(x, cos, unsqueeze_dim: int, d: int):
    """cos/sin's placement when q (or k) is sharded on dimension d: cos.unsqueeze(unsqueeze_dim) lines up
    with x from the right; where it has size 1 (or no dimension) it broadcasts and stays Replicate,
    elsewhere it must be sharded on the matching dimension so each rank reads its own positions."""
    S, R, _ = _p()
    n = cos.ndim + 1
    p = unsqueeze_dim + n if unsqueeze_dim < 0 else unsqueeze_dim
    j = d - (x.ndim - n)  # the dimension of cos.unsqueeze(p) lined up with x's dimension d
    if j < 0 or j == p:
        return R
    c = j if j < p else j - 1
    return R if cos.shape[c] == 1 else S(c)


def _rope_rules(a, b, cos, sin, unsqueeze_dim):
    S, _, _ = _p()
    rules = [_replicate_all(2, (a, b, cos, sin))]
    # Shard q and k on the same dimension counted from the right (their ranks may differ only in
    # leading dimensions), never the head dimension (the rotation pairs features within it).
    for e in range(2, min(a.ndim, b.ndim) + 1):
        da, db = a.ndim - e, b.ndim - e
        ca, cb = _cos_placement(a, cos, unsqueeze_dim, da), _cos_placement(b, cos, unsqueeze_dim, db)
        if ca != cb:
            continue
        rules.append(([S(da), S(db)], [S(da), S(db), ca, ca]))
    return rules


@_rule("rope", static=("unsqueeze_dim",))
def _rope(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    return _rope_rules(q, k, cos, sin, unsqueeze_dim)


@_rule("rope_backward", static=("unsqueeze_dim",))
def _rope_backward(grad_q, grad_k, cos, sin, unsqueeze_dim=1, interleaved=False):
    _, R, P = _p()
    return _rope_rules(grad_q, grad_k, cos, sin, unsqueeze_dim) + [([P, P], [P, P, R, R])]


# ---- losses -------------------------------------------------------------------------------------------

def _refuse_vocab_shard(op: str, name: str, t, dim: int, what: str) -> None:
    S, _, _ = _p()
    if any(isinstance(p, S) and p.dim % t.ndim == dim for p in t.placements):
        raise ValueError(
            f"torchfast.{op}: argument '{name}' is sharded on dimension {dim} ({what}; placements "
            f"{list(t.placements)}); torchfast's fused losses need the whole vocabulary on each rank "
            "(the log-sum-exp over a sharded vocabulary needs a cross-rank reduction they do not do). "
            "Shard the tokens instead (Shard on a leading dimension), or use torch's loss_parallel with "
            "F.cross_entropy for vocabulary-sharded logits")


@_rule("cross_entropy")
def _cross_entropy(logits, target, **_opts):
    _refuse_vocab_shard("cross_entropy", "logits", logits, logits.ndim - 1, "the classes")
    S, _, _ = _p()
    return [_replicate_all(2, (logits, target))] + [
        ([S(d), S(d)], [S(d), S(d)]) for d in range(logits.ndim - 1)]


@_rule("cross_entropy_backward")
def _cross_entropy_backward(grad_loss, logits, target, lse, **_opts):
    _refuse_vocab_shard("cross_entropy_backward", "logits", logits, logits.ndim - 1, "the classes")
    S, _, _ = _p()
    args = (grad_loss, logits, target, lse)
    return [_replicate_all(1, args), _partial_grad([1], args)] + [
        ([S(d)], [S(d)] * 4) for d in range(logits.ndim - 1)]


def _bits(mask: int) -> tuple[bool, bool, bool]:
    return bool(mask & 1), bool(mask & 2), bool(mask & 4)


@_rule("linear_cross_entropy", static=("reduction", "grad_mask"))
def _linear_cross_entropy(hidden, weight, target, bias=None, *, reduction="mean", grad_mask=0, **_opts):
    op = "linear_cross_entropy"
    _refuse_vocab_shard(op, "weight", weight, 0, "the vocabulary")
    if bias is not None:
        _refuse_vocab_shard(op, "bias", bias, 0, "the vocabulary")
    S, R, P = _p()
    rules = [_replicate_all(5, (hidden, weight, target, bias))]
    sharded = any(isinstance(p, S) for p in (*hidden.placements, *target.placements))
    if reduction == "mean" and sharded:
        # The mean divides by the count of non-ignored tokens of all ranks, which no rank knows;
        # torchfast.linear_cross_entropy turns a DTensor "mean" into "sum" / count before it gets here.
        raise ValueError(
            "torchfast.linear_cross_entropy: reduction='mean' of the op on token-sharded DTensors needs "
            "the global token count; call torchfast.linear_cross_entropy (which divides a 'sum' by it) "
            "or pass reduction='sum' or 'none'")
    gh, gw, gb = _bits(grad_mask)
    sums = reduction != "none"
    for d in range(hidden.ndim - 1):
        ins = [S(d), R, S(d), _opt(bias, R)]
        if sums:  # one loss per rank (its rows' sum): Partial, as are the weight and bias gradients
            outs = [P, S(d), S(d) if gh else R, P if gw else R, P if gb and bias is not None else R]
        else:  # per-token losses; the gradient outputs are empty placeholders
            outs = [S(d), S(d), R, R, R]
        rules.append((outs, ins))
    return rules


@_rule("linear_cross_entropy_backward", static=("grad_mask",))
def _linear_cross_entropy_backward(grad_loss, hidden, weight, target, bias, lse, *, grad_mask=7, **_opts):
    op = "linear_cross_entropy_backward"
    _refuse_vocab_shard(op, "weight", weight, 0, "the vocabulary")
    S, R, P = _p()
    gh, gw, gb = _bits(grad_mask)
    args = (grad_loss, hidden, weight, target, bias, lse)
    has_b = bias is not None
    rules = [_replicate_all(3, args)]
    rules.append(([P if gh else R, P if gw else R, P if gb and has_b else R],
                  [P, R, R, R, _opt(bias, R), R]))
    for d in range(hidden.ndim - 1):
        rules.append(([S(d) if gh else R, P if gw else R, P if gb and has_b else R],
                      [S(d), S(d), R, S(d), _opt(bias, R), S(d)]))
    return rules


# ---- registration -------------------------------------------------------------------------------------

def _strategy(fn: Callable, op_schema):
    """The OpStrategy of one call: fn's single-dimension rules expanded over every mesh dimension."""
    from torch.distributed.tensor._op_schema import OpStrategy
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    def spec(a):
        return a.strategies[0].output_spec if isinstance(a, OpStrategy) else a

    args = [spec(a) for a in op_schema.args_schema]
    kwargs = {k: spec(v) for k, v in op_schema.kwargs_schema.items()}
    rules = fn(*args, **kwargs)
    return expand_to_full_mesh_op_strategy(
        op_schema.get_mesh_from_args(),
        op_schema,
        [list(outs) + list(ins) for outs, ins in rules],
        input_index=len(op_schema.op._schema.returns),
        # Row-wise kernels run on shards of any size: an uneven split (7 tokens over 2 ranks) already
        # in place is kept, not gathered.
        allow_uneven_sharding=True,
    )


def register() -> None:
    """Register the rules of every torchfast op with DTensor (imports torch.distributed.tensor).
    Idempotent."""
    global _registered
    if _registered:
        return
    from functools import partial

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, (fn, static) in _RULES.items():
        op = getattr(torch.ops.torchfast, name).default
        # needs_pytree: the optional tensors (weight, bias, grad_h) may be None.
        info = RuntimeSchemaInfo(static_kwargkey=list(static) or None, needs_pytree=True)
        propagator.register_op_strategy(op, partial(_strategy, fn), info)
    _registered = True


class _OnImport(importlib.abc.MetaPathFinder):
    """Runs register() right after torch.distributed.tensor is imported, then leaves sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DT:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Make the rules available: now if DTensor is imported, else as soon as it is."""
    if not torch.distributed.is_available():
        return
    if _DT in sys.modules:
        register()
    elif not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport())
