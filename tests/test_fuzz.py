"""Property-based fuzzing (hypothesis) of swish, bias_act, rms_norm, layer_norm and cross_entropy
against their float64 references (torchfast/reference/): random shapes (empty, one element, tails of
every vector width), dtypes, CPU ISA variants, layouts and NaN/Inf positions; outputs and gradients.

Layouts. Torch has no negative strides (as_strided refuses them, flip copies), so "negative" has no
memory pattern to test; what torch can hand a kernel is covered instead:
    contiguous    dense rows
    transposed    a permutation of a dense tensor (dense, not contiguous)
    gaps          every 2nd or 3rd element along one dim (strided with holes)
    offset        a contiguous view starting 1-3 elements into its storage (unaligned vectors)
    expanded      size-1 dims broadcast by expand: stride 0, also in the last dim
    overlapping   as_strided rows that share elements (row stride < row length)
Every input is a view of a contiguous leaf `base`; gradients are checked on the leaf, so expanded and
overlapping views also check that the gradients of aliased elements add up. Special values (NaN, +-inf,
+-0) are written into `base`, so through expand/overlap one NaN may reach several rows.

Reproducible: derandomize=True (the same examples on every run), no example database. Each test
asserts it ran its `max_examples`; the counts are in docs/testing.md.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import torchfast
from torchfast.reference._activations import ACTS, act_grad
from torchfast.reference.bias_act import bias_act_reference
from torchfast.reference.cross_entropy import cross_entropy_reference
from torchfast.reference.layer_norm import layer_norm_reference
from torchfast.reference.rms_norm import rms_norm_reference
from torchfast.reference.swish import swish_reference
from torchfast.testing import TOLERANCES, assert_close
from torchfast.testing.bounds import math_dtype, norm_grad_slack, sum_slack

hypothesis = pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ISAS = torchfast._ext.runnable_cpu_isas() or [None]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "gaps", "offset", "expanded", "overlapping"]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0]
# Row lengths around the vector widths (8 and 16 fp32 lanes, 32 for bf16 pairs) and a few others.
ROW_LENGTHS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100]
MAX_EXAMPLES = 200  # per op: about 10 s for all five on the loaded 2-core CI machine

SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                    print_blob=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- inputs ---------------------------------------------------------------------------------------

class Input:
    """`view(base)` is the tensor the op gets; `base` is a contiguous leaf. `aliased`: whether two
    elements of the view can share one element of base (expanded, overlapping)."""

    def __init__(self, base, view, layout, aliased):
        self.base, self.view, self.layout, self.aliased = base, view, layout, aliased

    def __repr__(self):
        v = self.view(self.base)
        return f"Input({self.layout}, shape {list(v.shape)}, strides {v.stride()}, offset {v.storage_offset()})"


@st.composite
def inputs(draw, shape, dtype, layouts=LAYOUTS, specials=True, scale=None):
    """A tensor of logical `shape` in `dtype` with a drawn layout, values ~ N(0, scale^2) rounded to
    dtype, and up to three special values at drawn positions of its storage."""
    nd = len(shape)
    ok = [k for k in layouts if not (k == "transposed" and nd < 2) and not (k in ("gaps", "expanded") and nd < 1)
          and not (k == "overlapping" and (nd < 2 or shape[-1] < 2 or 0 in shape))]
    layout = draw(st.sampled_from(ok))
    base_shape, view, aliased = list(shape), (lambda b: b), False
    if layout == "transposed":
        perm = draw(st.permutations(range(nd)).filter(lambda p: list(p) != list(range(nd))))
        base_shape = [shape[p] for p in perm]
        inv = [perm.index(i) for i in range(nd)]
        view = lambda b, inv=inv: b.permute(inv)  # noqa: E731
    elif layout == "gaps":
        dim, step = draw(st.integers(0, nd - 1)), draw(st.integers(2, 3))
        base_shape[dim] *= step
        index = tuple([slice(None)] * dim + [slice(None, None, step)])
        view = lambda b, index=index: b[index]  # noqa: E731
    elif layout == "offset":
        off = draw(st.integers(1, 3))
        base_shape = [math.prod(shape) + off]
        view = lambda b, off=off: b[off:].view(shape)  # noqa: E731
    elif layout == "expanded":
        dims = draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True))
        base_shape = [1 if d in dims else s for d, s in enumerate(shape)]
        view = lambda b: b.expand(shape)  # noqa: E731
        aliased = any(shape[d] > 1 for d in dims)
    elif layout == "overlapping":
        n = shape[-1]
        strides = [1, draw(st.integers(1, n - 1))]  # row stride < row length: rows share elements
        for d in range(nd - 3, -1, -1):
            strides.append(strides[-1] * shape[d + 1])
        strides = strides[::-1]
        base_shape = [1 + sum((s - 1) * st_ for s, st_ in zip(shape, strides))]
        view = lambda b, strides=strides: b.as_strided(shape, strides)  # noqa: E731
        aliased = True
    scale = draw(st.sampled_from([0.5, 3.0, 30.0])) if scale is None else scale
    base = (torch.randn(base_shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
            * scale).to(dtype)
    if specials and base.numel():
        for _ in range(draw(st.integers(0, 3))):
            base.view(-1)[draw(st.integers(0, base.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    return Input(base, view, layout, aliased)


def shapes(min_dims=0, max_dims=3, last=None, max_lead=6):
    """Leading dims 0..max_lead (0 gives an empty tensor), last dim from ROW_LENGTHS (or `last`)."""
    last = st.sampled_from(ROW_LENGTHS) if last is None else last
    return st.integers(min_dims, max_dims).flatmap(
        lambda nd: st.just(()) if nd == 0 else st.tuples(*[st.integers(0, max_lead)] * (nd - 1), last))


def grad_outputs(draw, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense random, or an expanded (stride-0) one, as `y.sum().backward()` sends."""
    if draw(st.booleans()):
        return torch.full((), draw(st.sampled_from([1.0, -0.5])), dtype=dtype).expand(like.shape)
    return torch.randn(like.shape, dtype=dtype)


# ---- the check ------------------------------------------------------------------------------------

def check(isa, run, reference, leaves, g, slack=None, what="", relaxed=None):
    """run(*leaves) under `isa` against reference(*float64 leaves): output with the table tolerance of
    the leaves' dtype (NaN where the reference has NaN, inf with its sign), then the gradient of each
    leaf for grad_out g with the table's atol plus slack(ref leaves, ref grads)[i].

    relaxed: per leaf, a mask of gradient elements fed by a row that holds NaN or inf. There the
    reference's autograd and the kernels' closed forms legitimately place NaN differently (for a row
    with +inf, F.cross_entropy and torchfast give NaN for the whole row, the reference's autograd NaN
    for some elements), so only this is required: non-finite wherever the reference is non-finite."""
    dtype = leaves[0].dtype
    if isa is not None:
        torchfast._ext.set_cpu_isa(isa)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves)
    mine = [t.detach().clone().requires_grad_() for t in leaves]
    y = run(*mine)
    assert y.dtype == dtype, f"{what}: output dtype {y.dtype}, expected {dtype}"
    assert_close(y, ref, dtype=dtype, what=f"{what} [isa {isa}] output")
    if ref.numel() == 0:
        return
    want = torch.autograd.grad(ref, ref_leaves, g.double(), allow_unused=True)
    got = torch.autograd.grad(y, mine, g, allow_unused=True)
    extra = slack(ref_leaves, want) if slack else [0.0] * len(leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(mine[i]) if a is None else a
        b = torch.zeros_like(ref_leaves[i]) if b is None else b
        dt = mine[i].dtype  # an fp32 master weight's gradient is fp32
        label = f"{what} [isa {isa}] grad {i}"
        mask = None if relaxed is None else relaxed[i]
        if mask is True:
            mask = torch.ones_like(b, dtype=torch.bool)
        if mask is not None and bool(mask.any()):
            lost = mask & ~b.isfinite() & a.isfinite()
            assert not lost.any(), f"{label}: finite where the reference is not, at {lost.nonzero()[:4].tolist()}"
            a, b = a[~mask], b[~mask]
        assert_close(a, b, dtype=dt, atol=TOLERANCES[dt][1] + extra[i], what=label)


def alias_slack(inp: Input, ref_base, view_grad: torch.Tensor, dtype, elem_atol: float) -> float:
    """Extra error of the base's gradient when m view elements share one base element: autograd adds
    their gradients, each within elem_atol + rtol |term| of the exact one, in `dtype` (rounding each
    partial sum) where the reference adds them in float64; so m * elem_atol + (m + 1) * rtol * sum|terms|."""
    if not inp.aliased:
        return 0.0
    b = ref_base.detach().clone().requires_grad_()
    v = inp.view(b)
    summed, count = torch.autograd.grad(v, b, view_grad.detach().abs().nan_to_num(0.0, 0.0, 0.0),
                                        retain_graph=True)[0], torch.autograd.grad(v, b, torch.ones_like(v))[0]
    if not summed.numel():
        return 0.0
    m = float(count.max())
    return m * elem_atol + (m + 1) * TOLERANCES[dtype][0] * float(summed.max())


def poisoned(inp: Input, n_params: int) -> list[torch.Tensor]:
    """`relaxed` masks for a row-wise op: base elements that feed a row of the view holding NaN or inf
    (through aliasing, a base element may feed several rows), and, when any row does, every element of
    the n_params weights (their gradients sum over all rows)."""
    b = inp.base.detach().double().requires_grad_()
    v = inp.view(b)
    bad_rows = ~v.detach().isfinite().all(-1, keepdim=True) if v.dim() else ~v.detach().isfinite()
    (feeds,) = torch.autograd.grad(v, b, bad_rows.expand(v.shape).double())
    any_bad = bool(bad_rows.any())
    return [feeds > 0] + [None if not any_bad else True] * n_params


def view_grad(inp: Input, ref_base, fn, g) -> torch.Tensor:
    """The float64 reference's gradient with respect to the view itself (not its base): fn(view) for
    grad_out g."""
    v = inp.view(ref_base.detach()).detach().requires_grad_()
    y = fn(v)
    return torch.autograd.grad(y, v, g.double())[0] if y.numel() else torch.zeros_like(v)


def fuzz(test, strategy) -> Counter:
    """Run `test` on MAX_EXAMPLES drawn examples; returns how often each feature was drawn ("examples",
    "layout <name>", "dtype <dtype>", "isa <name>", "nonfinite"), so a test can assert its coverage."""
    seen = Counter()

    @SETTINGS
    @given(strategy)
    def prop(example):
        dtype, isa, x = example[:3]
        seen.update(["examples", f"layout {x.layout}", f"dtype {dtype}", f"isa {isa}"]
                    + (["nonfinite"] if not bool(x.base.isfinite().all()) else []))
        test(*example)

    prop()
    return seen


def assert_coverage(seen: Counter, layouts=LAYOUTS) -> None:
    """Every example ran, and every dtype, ISA variant and layout was drawn, some with NaN/inf: a
    strategy that stops reaching a case fails here instead of passing on less."""
    assert seen["examples"] == MAX_EXAMPLES, seen
    wanted = [f"layout {k}" for k in layouts] + [f"dtype {d}" for d in DTYPES] + [f"isa {i}" for i in ISAS]
    missing = [w for w in wanted if seen[w] == 0]
    assert not missing, f"never drawn: {missing} ({dict(seen)})"
    assert seen["nonfinite"] >= MAX_EXAMPLES // 10, seen


common = st.tuples(st.sampled_from(DTYPES), st.sampled_from(ISAS))


# ---- the properties -------------------------------------------------------------------------------

@st.composite
def activation_cases(draw, with_bias_op):
    dtype, isa = draw(common)
    shape = draw(shapes(min_dims=1 if with_bias_op else 0))
    x = draw(inputs(shape, dtype))
    act = draw(st.sampled_from(ACTS)) if with_bias_op else "swish"
    bias = None
    if with_bias_op and draw(st.booleans()):
        bias = (torch.randn(shape[-1]) * 2).to(dtype)
    g = grad_outputs(draw, x.view(x.base), dtype)
    return dtype, isa, x, act, bias, g


def _activation_test(use_bias_act):
    def test(dtype, isa, x, act, bias, g):
        leaves = [x.base] + ([bias] if bias is not None else [])
        if use_bias_act:
            run = lambda b, *bb: torchfast.bias_act(x.view(b), bb[0] if bb else None, act=act)  # noqa: E731
            ref = lambda b, *bb: bias_act_reference(x.view(b), bb[0] if bb else None, act=act)  # noqa: E731
        else:
            run = lambda b: torchfast.swish(x.view(b))  # noqa: E731
            ref = lambda b: swish_reference(x.view(b))  # noqa: E731

        def slack(ref_leaves, want):
            v = x.view(ref_leaves[0].detach())
            terms = g.double() * act_grad(act, v if bias is None else v + ref_leaves[1].detach())
            out = [alias_slack(x, ref_leaves[0], terms, dtype, TOLERANCES[dtype][1])]
            if bias is not None:
                out.append(sum_slack(dtype, terms.reshape(-1, terms.shape[-1])))
            return out

        check(isa, run, ref, leaves, g, slack, what=f"{'bias_act' if use_bias_act else 'swish'}({x}, act={act}, "
              f"bias={bias is not None}) {dtype}")

    return test


def test_fuzz_swish(restore_cpu_isa):
    assert_coverage(fuzz(_activation_test(False), activation_cases(False)))


def test_fuzz_bias_act(restore_cpu_isa):
    assert_coverage(fuzz(_activation_test(True), activation_cases(True)))


@st.composite
def norm_cases(draw, centered):
    dtype, isa = draw(common)
    shape = draw(shapes(min_dims=1))
    x = draw(inputs(shape, dtype))
    n = shape[-1]
    # weights: x's dtype, or float32 master weights for bf16/fp16 x (AMP), or absent
    pdtype = draw(st.sampled_from([dtype, torch.float32])) if dtype in (torch.bfloat16, torch.float16) else dtype
    w = (torch.rand(n) + 0.5).to(pdtype) if draw(st.booleans()) else None
    b = (torch.randn(n)).to(pdtype) if centered and draw(st.booleans()) else None
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1] + ([None] if not centered else [])))
    g = grad_outputs(draw, x.view(x.base), dtype)
    return dtype, isa, x, w, b, eps, g


def _norm_test(centered):
    def test(dtype, isa, x, w, b, eps, g):
        params = [p for p in (w, b) if p is not None]

        def split(ps):
            it = iter(ps)
            return (next(it) if w is not None else None), (next(it) if b is not None else None)

        def ref_of_view(view, ps):
            w_, b_ = split(ps)
            if centered:
                return layer_norm_reference(view, w_, b_, eps=eps)
            # eps None: the math type's machine epsilon, as the op takes it
            return rms_norm_reference(view, w_, eps=torch.finfo(math_dtype(dtype)).eps if eps is None else eps)

        def run(base, *ps):
            if centered:
                return torchfast.layer_norm(x.view(base), *split(ps), eps=eps)
            return torchfast.rms_norm(x.view(base), split(ps)[0], eps=eps)

        def ref(base, *ps):
            return ref_of_view(x.view(base), ps)

        def slack(ref_leaves, want):
            ps = [p.detach() for p in ref_leaves[1:]]
            v = x.view(ref_leaves[0].detach())
            dx, *rest = norm_grad_slack(v, g.double(), *split(ps), eps, centered=centered, dtype=dtype)
            if x.aliased:
                vg = view_grad(x, ref_leaves[0], lambda view: ref_of_view(view, ps), g)
                dx = dx + alias_slack(x, ref_leaves[0], vg, dtype, TOLERANCES[dtype][1] + dx)
            return [dx, *rest]

        check(isa, run, ref, [x.base, *params], g, slack, relaxed=poisoned(x, len(params)),
              what=f"{'layer_norm' if centered else 'rms_norm'}({x}, w={w is not None and w.dtype}, "
                   f"b={b is not None and b.dtype}, eps={eps}) {dtype}")

    return test


def test_fuzz_rms_norm(restore_cpu_isa):
    assert_coverage(fuzz(_norm_test(False), norm_cases(False)))


def test_fuzz_layer_norm(restore_cpu_isa):
    assert_coverage(fuzz(_norm_test(True), norm_cases(True)))


@st.composite
def cross_entropy_cases(draw):
    dtype, isa = draw(common)
    shape = draw(shapes(min_dims=1, max_dims=3))
    x = draw(inputs(shape, dtype, scale=draw(st.sampled_from([1.0, 5.0]))))
    v = shape[-1]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    target = torch.randint(0, v, shape[:-1], generator=gen)
    ignore_index = draw(st.sampled_from([-100, 0]))
    if target.numel() and draw(st.booleans()):
        target.view(-1)[torch.randint(0, target.numel(), (max(1, target.numel() // 3),), generator=gen)] = ignore_index
    opts = {
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
        "z_loss": draw(st.sampled_from([0.0, 1e-3])),
        "softcap": draw(st.sampled_from([None, 5.0])),
    }
    rows = torch.empty(shape[:-1])
    g = grad_outputs(draw, rows if opts["reduction"] == "none" else torch.empty(()), dtype)
    return dtype, isa, x, target, opts, g


def _cross_entropy_test(dtype, isa, x, target, opts, g):
    def slack(ref_leaves, want):
        if not x.aliased:
            return [0.0]
        vg = view_grad(x, ref_leaves[0], lambda v: cross_entropy_reference(v, target, **opts), g)
        return [alias_slack(x, ref_leaves[0], vg, dtype, TOLERANCES[dtype][1])]

    check(isa, lambda b: torchfast.cross_entropy(x.view(b), target, **opts),
          lambda b: cross_entropy_reference(x.view(b), target, **opts), [x.base], g, slack, relaxed=poisoned(x, 0),
          what=f"cross_entropy({x}, target {list(target.shape)}, {opts}) {dtype}")


def test_fuzz_cross_entropy(restore_cpu_isa):
    assert_coverage(fuzz(_cross_entropy_test, cross_entropy_cases()))
