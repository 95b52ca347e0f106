"""PyTorch's own OpInfo samples run through torchfast: a conformance suite nobody here wrote.

PyTorch describes each of its operators in `torch.testing._internal.common_methods_invocations.op_db`
with generators of inputs: `reference_inputs` (the samples PyTorch's own tests use: odd and empty
shapes, scalars, non-contiguous, zero-stride and overlapping layouts, large tensors) and
`error_inputs` (calls that must fail). This module maps the samples of the operators torchfast mirrors
onto torchfast's public calls:

    OpInfo name                  torchfast call(s)
    nn.functional.silu           swish(x);  bias_act(x, zeros, act="swish")
    nn.functional.gelu           nn.GELU(approximate)(x);  bias_act(x, zeros, act="gelu" | "gelu_tanh")
    nn.functional.relu           bias_act(x, None, act="relu");  bias_act(x, zeros, act="relu")
    nn.functional.rms_norm       rms_norm(x, weight, eps=eps)
    nn.functional.layer_norm     layer_norm(x, weight, bias, eps=eps)
    nn.functional.cross_entropy  cross_entropy(x.movedim(1, -1), target, ...)   (classes last)

The `zeros` bias (x + 0 is x) sends the same values through bias_act's row kernel, which the call
without a bias does not reach. A `normalized_shape` of k > 1 dims normalizes the k last dims together,
which is a normalization of one flattened dim: x and the weights are flattened to it and the result
reshaped back (`Case.note` says so). Each sample is also run a second time made non-contiguous by
OpInfo's own `SampleInput.noncontiguous()` (every tensor a strided view with NaN in the gaps, so a
kernel that reads a gap returns NaN), unless it already was.

Every sample ends in one of three outcomes:
    Case      checked: torchfast's output (and the gradient of every float input) against PyTorch's
              own op run in float64 on the same values
    Rejected  torchfast refuses it by contract (eps < 0): the call must raise, naming op and argument
    Skipped   an option torchfast does not have (class weights, probability targets), by reason

Importing op_db needs the `expecttest` package (the `test` extra) and takes about 5 s.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

import torchfast
from torchfast.testing import TOLERANCES, assert_close
from torchfast.testing.bounds import norm_grad_slack, sum_slack

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class Case:
    """One checked call: `torchfast_fn(*inputs)` must equal `torch_fn(*inputs)` (PyTorch's op, run in
    float64 on the same values), and so must the gradients with respect to every tensor in `inputs`."""

    op: str
    call: str
    sample: str
    inputs: tuple[torch.Tensor, ...]
    torchfast_fn: Callable[..., torch.Tensor]
    torch_fn: Callable[..., torch.Tensor]
    note: str = ""
    # (float64 inputs, grad_out, float64 input gradients) -> per input, what the gradient's atol adds
    # to the table's: the error that summing or cancelling many terms may legitimately leave
    grad_slack: Callable[..., list[float]] | None = None


@dataclass
class Rejected:
    """A sample torchfast refuses by contract: `call()` must raise `error` with a message that starts
    with 'torchfast.' and names `argument`."""

    op: str
    reason: str
    sample: str
    call: Callable[[], object]
    error: type[BaseException]
    argument: str


@dataclass
class Skipped:
    op: str
    reason: str
    sample: str


Outcome = Case | Rejected | Skipped


@dataclass
class Counts:
    """What one op's samples became, for one dtype."""

    samples: int = 0
    cases: int = 0
    rejected: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)


# Samples larger than this (OpInfo's 1029 x 917 and 1024 x 1024 tensors) run in float32 only, under
# the active ISA variant only, and get no non-contiguous twin (OpInfo has a strided large sample of its
# own). They add the kernels' multi-thread split (and bias_act's per-thread partial bias sums), which do
# not depend on the ISA; checking a million elements costs about 0.5 s on the loaded 2-core CI machine,
# too much to repeat per dtype and variant. Tails and strides of every size below this run in every
# dtype under every variant.
LARGE_NUMEL = 1 << 16
LARGE_DTYPES = (torch.float32,)
LARGE_SKIP = "large sample (> 65536 elements): checked in float32 only"



# ---- the OpInfo database ------------------------------------------------------------------------

def op_infos() -> dict[str, object]:
    """OpInfo entries of the mapped ops, by name (the default variant of each)."""
    return {op.name: op for op in _op_db() if op.name in MAPPERS and op.variant_test_name == ""}


def _op_db():
    """PyTorch's op_db, imported without keeping the process-wide changes its test utilities make on
    import (for PyTorch's own suite), so the tests that run after it in the same process see the same
    torch as before: torch.backends flags frozen (bare `torch.backends.cudnn.enabled = ...` would raise),
    TorchScript calls wrapped in a profiling hook, and the hypothesis profile switched to 'dev'."""
    import torch.backends

    frozen = torch.backends.flags_frozen()
    script_calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    try:
        import hypothesis

        profile = hypothesis.settings.get_current_profile_name()
    except (ImportError, AttributeError):
        profile = None
    from torch.testing._internal.common_methods_invocations import op_db

    if not frozen and torch.backends.flags_frozen():
        # the flag lives in the globals of the module's functions (torch.backends' module object is
        # not the dict they read), and has no public setter
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    if profile is not None:
        hypothesis.settings.load_profile(profile)
    return op_db


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"Tensor{list(t.shape)}{'' if t.is_contiguous() else f' strides {t.stride()}'}"
    if isinstance(t, (tuple, list)):
        return "(" + ", ".join(_describe(a) for a in t) + ")"
    return repr(t)


def _summary(sample) -> str:
    kw = ", ".join(f"{k}={_describe(v)}" for k, v in sample.kwargs.items())
    return f"{_describe(sample.input)}, args={_describe(sample.args)}" + (f", {kw}" if kw else "")


def _all_contiguous(sample) -> bool:
    ts = [sample.input, *sample.args, *sample.kwargs.values()]
    return all(t.is_contiguous() for t in ts if isinstance(t, torch.Tensor))


def samples(op, dtype: torch.dtype, device: str = "cpu") -> Iterator[object]:
    """OpInfo's reference inputs for `op`, each followed by its non-contiguous twin when it was
    contiguous and not large (OpInfo seeds its own generators, so the samples are the same on every run)."""
    for s in op.reference_inputs(device, dtype, requires_grad=False):
        yield s
        if not _all_contiguous(s) or s.input.numel() > LARGE_NUMEL:
            continue  # the large twin would repeat OpInfo's own strided large sample
        nc = s.noncontiguous()
        nc.name = (s.name or "") + "_noncontiguous"
        yield nc


# ---- the mappers: one OpInfo sample -> outcomes ----------------------------------------------------

def _zeros_bias(x):
    return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)


def _activation(op: str, act_of: Callable[[dict], str | None], no_bias_call, torch_op):
    """Mapper of an elementwise activation: the public call without a bias, and bias_act with a zero
    bias (x must have a last dimension)."""

    def mapper(sample) -> list[Outcome]:
        summary = _summary(sample)
        kwargs = dict(sample.kwargs)
        if kwargs.pop("inplace", False):
            return [Skipped(op, "inplace=True (torchfast ops are out of place)", summary)]
        act = act_of(kwargs)
        x = sample.input
        out: list[Outcome] = [
            Case(op, no_bias_call(kwargs), summary, (x,), lambda x: _no_bias(act, kwargs)(x),
                 lambda x: torch_op(x, **kwargs)),
        ]
        if x.dim() >= 1:
            out.append(Case(op, f"bias_act(x, zeros, act={act!r})", summary, (x, _zeros_bias(x)),
                            lambda x, b: torchfast.bias_act(x, b, act=act),
                            lambda x, b: torch_op(x + b, **kwargs), grad_slack=_bias_slack))
        return out

    return mapper


def _bias_slack(ref_in, g, ref_grads):
    """The bias gradient is the sum over rows of x's gradient."""
    x, b = ref_in
    return [0.0, sum_slack(g.dtype, ref_grads[0].reshape(-1, b.shape[0]))]


def _no_bias(act: str, kwargs: dict):
    if act == "swish":
        return torchfast.swish
    if act in ("gelu", "gelu_tanh"):
        return torchfast.nn.GELU(kwargs.get("approximate", "none"))
    return lambda x: torchfast.bias_act(x, None, act=act)


_GELU_ACTS = {"none": "gelu", "tanh": "gelu_tanh"}

_silu = _activation("nn.functional.silu", lambda kw: "swish", lambda kw: "swish(x)", F.silu)
_relu = _activation("nn.functional.relu", lambda kw: "relu", lambda kw: "bias_act(x, None, act='relu')", F.relu)
_gelu = _activation("nn.functional.gelu", lambda kw: _GELU_ACTS.get(kw.get("approximate", "none"), "?"),
                    lambda kw: f"nn.GELU(approximate={kw.get('approximate', 'none')!r})(x)", F.gelu)


def _gelu_error(sample) -> list[Outcome]:
    """OpInfo's bad gelu calls carry an unknown `approximate`: torchfast.nn.GELU must refuse it."""
    approximate = sample.kwargs.get("approximate", "none")
    x = sample.input
    return [Rejected("nn.functional.gelu", f"approximate={approximate!r}", _summary(sample),
                     lambda: torchfast.nn.GELU(approximate)(x), ValueError, "approximate")]


def _norm_parts(sample, n_params: int):
    """(x, normalized_shape, params, eps given?, eps) of an rms_norm / layer_norm sample."""
    args = list(sample.args)
    shape = tuple(args[0]) if isinstance(args[0], (tuple, list)) else (args[0],)
    params = [args[i + 1] if i + 1 < len(args) else None for i in range(n_params)]
    for i, name in enumerate(("weight", "bias")[:n_params]):
        if name in sample.kwargs:
            params[i] = sample.kwargs[name]
    eps_index = n_params + 1
    eps = sample.kwargs.get("eps", args[eps_index] if eps_index < len(args) else None)
    return sample.input, shape, params, eps


def _norm(op: str, fn, torch_op, n_params: int, default_eps):
    """Mapper of rms_norm / layer_norm: the k normalized dims flattened into one, the weights too."""

    def mapper(sample) -> list[Outcome]:
        summary = _summary(sample)
        x, shape, params, eps = _norm_parts(sample, n_params)
        k = len(shape)
        if k == 0 or tuple(x.shape[x.dim() - k:]) != shape or x.dim() < k:
            return [Skipped(op, "normalized_shape is not x's trailing dims (torchfast normalizes the last dim)",
                            summary)]
        eps = default_eps if eps is None else eps
        present = [p for p in params if p is not None]

        def call(x, *given):
            it = iter(given)
            ps = [None if p is None else next(it).flatten() for p in params]
            y = fn(x.flatten(-k) if k > 1 else x, *ps, eps=eps)
            return y.reshape(x.shape)

        def reference(x, *given):
            it = iter(given)
            ps = [None if p is None else next(it) for p in params]
            return torch_op(x, shape, *ps, eps=eps)

        if eps is not None and eps < 0:
            return [Rejected(op, "eps < 0 (torchfast requires eps >= 0)", summary,
                             lambda: call(x, *present), ValueError, "eps")]
        def slack(ref_in, g, ref_grads):
            return _norm_slack(ref_in, g, [p is not None for p in params], k, eps, centered=n_params == 2)

        note = f"normalized_shape of {k} dims flattened to one" if k > 1 else ""
        return [Case(op, f"{fn.__name__}(x, ...{', eps=' + repr(eps) if eps is not None else ''})", summary,
                     (x, *present), call, reference, note, slack)]

    return mapper


def _norm_slack(ref_in, g, given: list[bool], k: int, eps, centered: bool) -> list[float]:
    """bounds.norm_grad_slack on the sample's rows (its k normalized dims flattened into one)."""
    x, *ps = ref_in
    flat = (lambda t: t.flatten(-k) if k > 1 else t)
    it = iter(ps)
    w, b = ([next(it).flatten() if here else None for here in given] + [None, None])[:2]
    return norm_grad_slack(flat(x), flat(g), w, b, eps, centered=centered, dtype=g.dtype)


def _norm_error(op: str, fn, n_params: int):
    """OpInfo's bad rms_norm calls mapped like the samples: a weight whose shape is not
    normalized_shape must be refused naming 'weight'; a normalized_shape that is not x's trailing
    dims has no torchfast counterpart (torchfast has no normalized_shape argument)."""

    def mapper(sample) -> list[Outcome]:
        summary = _summary(sample)
        x, shape, params, eps = _norm_parts(sample, n_params)
        k = len(shape)
        if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
            return [Skipped(op, "normalized_shape is not x's trailing dims (torchfast normalizes the last dim)",
                            summary)]
        ps = [None if p is None else p.flatten() for p in params]
        xf = x.flatten(-k) if k > 1 else x
        bad = next((name for name, p in zip(("weight", "bias"), params) if p is not None and tuple(p.shape) != shape),
                   None)
        if bad is None:
            return [Skipped(op, "no torchfast counterpart", summary)]
        return [Rejected(op, f"'{bad}' shape is not normalized_shape", summary,
                         lambda: fn(xf, *ps, eps=1e-5 if eps is None else eps), RuntimeError, bad)]

    return mapper


def _cross_entropy(sample) -> list[Outcome]:
    op = "nn.functional.cross_entropy"
    summary = _summary(sample)
    x, target = sample.input, sample.args[0]
    kwargs = dict(sample.kwargs)
    if target.is_floating_point():
        return [Skipped(op, "probability targets (torchfast takes class indices)", summary)]
    if kwargs.get("weight") is not None:
        return [Skipped(op, "class weights (torchfast has no weight argument)", summary)]
    unknown = set(kwargs) - {"ignore_index", "reduction", "label_smoothing"}
    if unknown:
        return [Skipped(op, f"options {sorted(unknown)}", summary)]

    def call(x):
        logits = x if x.dim() == 1 else x.movedim(1, -1)  # F.cross_entropy's classes are dim 1
        return torchfast.cross_entropy(logits, target, **kwargs)

    return [Case(op, f"cross_entropy(x.movedim(1, -1), target{''.join(f', {k}={v!r}' for k, v in kwargs.items())})",
                 summary, (x,), call, lambda x: F.cross_entropy(x, target, **kwargs))]


MAPPERS: dict[str, Callable[[object], list[Outcome]]] = {
    "nn.functional.silu": _silu,
    "nn.functional.gelu": _gelu,
    "nn.functional.relu": _relu,
    "nn.functional.rms_norm": _norm("nn.functional.rms_norm", torchfast.rms_norm, F.rms_norm, 1, None),
    "nn.functional.layer_norm": _norm("nn.functional.layer_norm", torchfast.layer_norm, F.layer_norm, 2, 1e-5),
    "nn.functional.cross_entropy": _cross_entropy,
}
ERROR_MAPPERS: dict[str, Callable[[object], list[Outcome]]] = {
    "nn.functional.gelu": _gelu_error,
    "nn.functional.rms_norm": _norm_error("nn.functional.rms_norm", torchfast.rms_norm, 1),
    "nn.functional.layer_norm": _norm_error("nn.functional.layer_norm", torchfast.layer_norm, 2),
}


def outcomes(op, dtype: torch.dtype, device: str = "cpu") -> tuple[list[Outcome], Counts]:
    """Every sample of `op` (an OpInfo) in `dtype`, mapped; and the counts."""
    out, counts = [], Counts()
    for s in samples(op, dtype, device):
        counts.samples += 1
        if s.input.numel() > LARGE_NUMEL and dtype not in LARGE_DTYPES:
            out.append(Skipped(op.name, LARGE_SKIP, _summary(s)))
            continue
        out.extend(MAPPERS[op.name](s))
    for o in out:
        if isinstance(o, Case):
            counts.cases += 1
        elif isinstance(o, Rejected):
            counts.rejected[o.reason] += 1
        else:
            counts.skipped[o.reason] += 1
    return out, counts


def error_outcomes(op, device: str = "cpu") -> list[Outcome]:
    """OpInfo's error inputs of `op`, mapped (an op without error inputs, or without a mapper, has none)."""
    if op.name not in ERROR_MAPPERS or op.error_inputs_func is None:
        return []
    return [o for e in op.error_inputs(device) for o in ERROR_MAPPERS[op.name](e.sample_input)]


# ---- the checks ---------------------------------------------------------------------------------

def _grad_out(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(like.shape, dtype=dtype, device=like.device)


def check_case(case: Case, isas: list[str | None]) -> None:
    """Output and gradients of `case` under each CPU ISA variant in `isas` (None: the active one;
    above LARGE_NUMEL elements, the active one only) against PyTorch's op in float64 on the
    same values, with the tolerance table of the input dtype. Also: the output has PyTorch's shape and
    the input's dtype."""
    from torchfast import _ext

    if case.inputs[0].numel() > LARGE_NUMEL:
        isas = [None]
    dtype = case.inputs[0].dtype
    ref_in = [t.detach().double().requires_grad_() for t in case.inputs]
    ref = case.torch_fn(*ref_in)
    g = _grad_out(ref, dtype)
    ref_grads = (torch.autograd.grad(ref, ref_in, g.double(), allow_unused=True) if ref.numel()
                 else [torch.zeros_like(t) for t in ref_in])
    for isa in isas:
        if isa is not None or _ext.built():
            _ext.set_cpu_isa(isa)  # None restores ATen's choice
        where = f"{case.op} -> {case.call} [{dtype}, isa {isa or _ext.active_cpu_isa()}] on sample {case.sample}"
        leaves = [t.detach().requires_grad_() for t in case.inputs]
        y = case.torchfast_fn(*leaves)
        if y.dtype != dtype:
            raise AssertionError(f"{where}: output dtype {y.dtype}, expected {dtype}")
        assert_close(y, ref, dtype=dtype, what=f"{where}: output")
        grads = (torch.autograd.grad(y, leaves, g, allow_unused=True) if y.numel()
                 else [torch.zeros_like(t) for t in leaves])
        slack = case.grad_slack(ref_in, g, ref_grads) if case.grad_slack and ref.numel() else [0.0] * len(ref_in)
        for i, (got, want) in enumerate(zip(grads, ref_grads)):
            got = torch.zeros_like(leaves[i]) if got is None else got
            want = torch.zeros_like(ref_in[i]) if want is None else want
            assert_close(got, want, dtype=dtype, atol=TOLERANCES[dtype][1] + slack[i],
                         what=f"{where}: gradient of input {i}")


def check_rejected(r: Rejected) -> None:
    """The call must raise `r.error` with a message naming the torchfast op and the argument."""
    try:
        r.call()
    except r.error as e:
        msg = str(e)
        if not msg.startswith("torchfast.") or r.argument not in msg:
            raise AssertionError(f"{r.op} ({r.reason}) on {r.sample}: message does not start with 'torchfast.' "
                                 f"and name '{r.argument}': {msg!r}") from e
        return
    except Exception as e:  # noqa: BLE001  (the wrong kind of error is a failure, with its text)
        raise AssertionError(f"{r.op} ({r.reason}) on {r.sample}: raised {type(e).__name__} ({e}), expected "
                             f"{r.error.__name__}") from e
    raise AssertionError(f"{r.op} ({r.reason}) on {r.sample}: torchfast accepted it; expected {r.error.__name__}")


# ---- the count table (docs/testing.md) ------------------------------------------------------------

def main() -> None:
    """Print, per op and dtype, how many OpInfo samples were mapped and what became of them."""
    torch.manual_seed(0)
    infos = op_infos()
    print(f"{'op':30} {'dtype':9} {'samples':>7} {'checked':>7} {'rejected':>8} {'skipped':>7}  reasons")
    for name in MAPPERS:
        for dtype in FLOAT_DTYPES:
            _, c = outcomes(infos[name], dtype)
            reasons = "; ".join(f"{n} x {r}" for r, n in (c.rejected + c.skipped).items())
            print(f"{name:30} {str(dtype)[6:]:9} {c.samples:7} {c.cases:7} {sum(c.rejected.values()):8} "
                  f"{sum(c.skipped.values()):7}  {reasons}")
        errors = error_outcomes(infos[name])
        if errors:
            kinds = Counter(type(o).__name__ for o in errors)
            print(f"{name:30} error inputs: {dict(kinds)}")


if __name__ == "__main__":
    main()
