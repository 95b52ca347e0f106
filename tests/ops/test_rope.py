"""Numerics and operator behaviour of torchfast.rope (rotary position embedding of q and k).

Opcheck, gradcheck/gradgradcheck in float64 (cos/sin included), compile(fullgraph) and autocast run for
the registered samples in tests/test_conformance.py; here: values against the float64 reference for
every sample, dtype and CPU ISA variant, transformers' formula, the backward's identity with the
rotation by -sin, the mixed bf16/fp32 contract, NaN/Inf, what autograd keeps, and the errors."""

import pytest
import torch

import torchfast
from torchfast.ops.rope import rope_cache
from torchfast.reference.rope import rope_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES

SPEC = torchfast.REGISTRY["rope"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SAMPLE_IDS = ["BHTD-gqa", "BTHD-interleaved", "transposed-q-partial-70-of-76", "empty"]


def _extra_cases(device, dtype):
    """More layouts than the registry's (tiny) samples: interleaved partial rotary over an odd number of
    pairs with float32 cos/sin for bf16/fp16, a batch-broadcast cos with [B, T, H, D], 3-D q (no batch),
    and a q that is a slice with gaps (copied to a stride-1 last dimension)."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    cs32 = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    cs = lambda *shape, dt=dtype: (torch.randn(*shape, device=device, dtype=dt),  # noqa: E731
                                   torch.randn(*shape, device=device, dtype=dt))
    return [
        ((make(2, 3, 5, 40), make(2, 1, 5, 40), *cs(2, 5, 30, dt=cs32)), {"interleaved": True}),
        ((make(2, 5, 4, 64), make(2, 5, 2, 64), *cs(1, 5, 64)), {"unsqueeze_dim": 2}),
        ((make(6, 4, 32), make(6, 1, 32), *cs(6, 32)), {"unsqueeze_dim": 1}),
        ((make(2, 3, 5, 32)[..., ::2], make(2, 1, 5, 16), *cs(2, 5, 16)), {}),
    ]


EXTRA_IDS = ["interleaved-partial-15-pairs-fp32cos", "BTHD-batch-broadcast", "3d-q", "q-with-gaps"]
CASES = [("sample", i) for i in range(len(SAMPLE_IDS))] + [("extra", i) for i in range(len(EXTRA_IDS))]
CASE_IDS = SAMPLE_IDS + EXTRA_IDS


def _case(kind, i, device, dtype):
    return (SPEC.sample_inputs if kind == "sample" else _extra_cases)(device, dtype)[i]


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, written from its formula."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(args, kwargs, dtype, cos_sin_grad=False, impl=None):
    q, k, cos, sin = (a.detach().clone().requires_grad_(i < 2 or cos_sin_grad) for i, a in enumerate(args))
    qr, kr = torchfast.rope(q, k, cos, sin, impl=impl, **kwargs)
    assert qr.dtype == kr.dtype == dtype and qr.shape == q.shape and kr.shape == k.shape
    assert qr.stride() == torch.empty_like(q).stride() and kr.stride() == torch.empty_like(k).stride()
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    leaves = (q, k, cos, sin) if cos_sin_grad else (q, k)
    if qr.numel():
        grads = torch.autograd.grad((qr, kr), leaves, (gq, gk))
    else:
        grads = [torch.zeros_like(t) for t in leaves]
    r64 = [a.detach().double().requires_grad_() for a in (q, k, cos, sin)]
    eq, ek = rope_reference(*r64, **kwargs)
    egrads = torch.autograd.grad((eq, ek), r64[: len(leaves)], (gq.double(), gk.double()), allow_unused=True)
    assert_close(qr, eq, dtype=dtype, what="q_rot")
    assert_close(kr, ek, dtype=dtype, what="k_rot")
    for name, g, e in zip(("grad q", "grad k", "grad cos", "grad sin"), grads, egrads):
        e = torch.zeros_like(g, dtype=torch.float64) if e is None else e
        # cos/sin gradients are sums over heads and batch: a few roundings more than one output's.
        rtol, atol = (None, None) if name in ("grad q", "grad k") else (1e-4, 1e-5)
        assert_close(g, e, dtype=g.dtype, rtol=rtol if g.dtype != torch.float64 else None, atol=atol
                     if g.dtype != torch.float64 else None, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_backward_match_reference(case, device, dtype):
    args, kwargs = _case(*case, device, dtype)
    _check(args, kwargs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=CASE_IDS[:3] + CASE_IDS[4:])
def test_cos_sin_gradients_match_reference(case, dtype):
    args, kwargs = _case(*case, "cpu", dtype)
    _check(args, kwargs, dtype, cos_sin_grad=True)


@pytest.fixture
def isas(restore_cpu_isa):
    if not torchfast._ext.built():
        pytest.skip("the C++ extension is not built")
    return torchfast._ext.runnable_cpu_isas()


def test_every_cpu_isa_variant_matches_reference(isas):
    """Each compiled ISA variant this CPU runs: every case, float32, float64 and bfloat16 (with fp32
    cos/sin in some), against the float64 reference."""
    for isa in isas:
        torchfast._ext.set_cpu_isa(isa)
        assert torchfast._ext.active_cpu_isa() == isa
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for case in CASES:
                _check(*_case(*case, "cpu", dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_transformers_formula_with_rope_cache(dtype):
    """[B, H, T, D] with GQA and position ids per batch row, cos/sin from rope_cache: the value of
    transformers' expression, forward and backward."""
    b, t, d = 2, 7, 32
    pos = torch.stack([torch.arange(t), torch.arange(t) + 5])
    cos, sin = rope_cache(pos, d, dtype=dtype)
    q = torch.randn(b, 4, t, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, 2, t, d, dtype=dtype, requires_grad=True)
    qr, kr = torchfast.rope(q, k, cos, sin)
    g = (torch.randn_like(qr), torch.randn_like(kr))
    grads = torch.autograd.grad((qr, kr), (q, k), g)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    eq, ek = _hf_rope(q64, k64, cos.double(), sin.double())
    egrads = torch.autograd.grad((eq, ek), (q64, k64), tuple(x.double() for x in g))
    assert_close(qr, eq, dtype=dtype)
    assert_close(kr, ek, dtype=dtype)
    for got, exp in zip(grads, egrads):
        assert_close(got, exp, dtype=dtype, what="grad")


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_the_rotation_by_minus_sin(dtype, interleaved):
    """For RoPE's cos/sin (pairs share an angle) the transposed rotation rope_backward computes is
    rope(-sin): bit for bit, since x * (-s) is -(x * s) exactly. Partial rotary: the tail passes."""
    cos, sin = rope_cache(torch.arange(9), 16, interleaved=interleaved)
    gq, gk = torch.randn(2, 4, 9, 24, dtype=dtype), torch.randn(2, 1, 9, 24, dtype=dtype)
    kw = {"unsqueeze_dim": 0, "interleaved": interleaved}
    back = torch.ops.torchfast.rope_backward(gq, gk, cos, sin, **kw)
    fwd = torch.ops.torchfast.rope(gq, gk, cos, -sin, **kw)
    for a, b, g in zip(back, fwd, (gq, gk)):
        assert torch.equal(a, b)
        assert torch.equal(a[..., 16:], g[..., 16:])


def test_bf16_with_fp32_cos_rounds_the_fp32_result_once():
    """The kernel contract for bf16 q/k with fp32 cos/sin: q's dtype, the float32 math rounded once.
    The eager expression promotes to a float32 result instead; rounding that gives ours (the float32
    values agree to float32 rounding, so the bf16 roundings agree but for ties near a boundary)."""
    cos, sin = rope_cache(torch.arange(64), 64)
    q, k = torch.randn(2, 8, 64, 64, dtype=torch.bfloat16), torch.randn(2, 2, 64, 64, dtype=torch.bfloat16)
    qr, kr = torchfast.rope(q, k, cos, sin, unsqueeze_dim=0)
    eq, ek = _hf_rope(q, k, cos, sin, unsqueeze_dim=0)
    assert eq.dtype == torch.float32 and qr.dtype == torch.bfloat16
    for got, exp in ((qr, eq), (kr, ek)):
        differ = (got != exp.to(torch.bfloat16)).sum().item()
        assert differ <= got.numel() * 1e-3, f"{differ} of {got.numel()} differ from the eager result rounded"
        assert_close(got, exp, dtype=torch.bfloat16)


@pytest.mark.parametrize("interleaved", [False, True])
def test_nan_and_inf_propagate_as_the_reference(interleaved):
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 1, 4, 8)
    q[0, 0, 0, 1], q[0, 1, 2, 5], k[0, 0, 3, 0] = float("nan"), float("inf"), float("-inf")
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    cos[0, 1, 2] = 0.0  # inf * 0 = NaN where the reference has it
    q[0, 0, 1, 2] = float("inf")
    got = torchfast.rope(q, k, cos, sin, interleaved=interleaved)
    exp = rope_reference(q.double(), k.double(), cos.double(), sin.double(), interleaved=interleaved)
    assert any(e.isnan().any() for e in exp) and any(e.isinf().any() for e in exp)
    for g, e in zip(got, exp):
        assert_close(g, e, dtype=torch.float32)  # NaN where NaN, the same infinities


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_forward_saves_cos_and_sin_only_unless_they_need_grad():
    q, k = torch.randn(2, 4, 16, 32, requires_grad=True), torch.randn(2, 2, 16, 32, requires_grad=True)
    cos, sin = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    cs = 2 * cos.numel() * cos.element_size()
    assert _saved_bytes(lambda: torchfast.rope(q, k, cos, sin)) == cs
    qk = (q.numel() + k.numel()) * 4
    cos.requires_grad_()
    assert _saved_bytes(lambda: torchfast.rope(q, k, cos, sin)) == cs + qk


def test_autocast_casts_cos_sin_only_where_the_kernel_does_not_take_them():
    q, k = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16), torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"torchfast\.rope: 'cos' and 'sin' have dtype torch.float64 but 'q' "
                                        r"has "
                                        r"dtype torch.bfloat16; they must have q's dtype or float32"):
        torchfast.rope(q, k, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qr, kr = torchfast.rope(q, k, cos, sin)
    assert qr.dtype == kr.dtype == torch.bfloat16
    exp = torchfast.rope(q, k, cos.float(), sin.float())
    assert torch.equal(qr, exp[0]) and torch.equal(kr, exp[1])


def _bad(**over):
    args = {"q": torch.randn(2, 3, 5, 8), "k": torch.randn(2, 1, 5, 8), "cos": torch.randn(2, 5, 8),
            "sin": torch.randn(2, 5, 8)}
    kw = {k: over.pop(k) for k in ("unsqueeze_dim", "interleaved") if k in over}
    args.update(over)
    return args, kw


# (arguments, error type, message of the public function, message of the C++ kernel: it prints dtypes
# the c10 way, "Float")
BAD = [
    (_bad(q=torch.ones(2, 3, 5, 8, dtype=torch.int64)), TypeError,
     r"rope: argument 'q' has dtype torch.int64",
     None),
    (_bad(k=torch.randn(2, 1, 5, 8, dtype=torch.float64)), TypeError,
     r"rope: 'q' has dtype torch.float32 but 'k' has dtype torch.float64; they must match",
     r"rope: 'q' has dtype Float but 'k' has dtype Double; they must match"),
    (_bad(cos=torch.randn(2, 5, 8, dtype=torch.float16), sin=torch.randn(2, 5, 8, dtype=torch.float16)),
     TypeError,
     r"rope: 'cos' and 'sin' have dtype torch.float16 but 'q' has dtype torch.float32; "
     r"they must have q's dtype$",
     r"rope: 'cos' and 'sin' have dtype Half but 'q' has dtype Float; they must have q's dtype$"),
    (_bad(sin=torch.randn(2, 5, 6)), RuntimeError,
     r"rope: 'cos' has shape \[2, 5, 8\] but 'sin' has shape \[2, 5, 6\]",
     "same"),
    (_bad(cos=torch.randn(2, 5, 7), sin=torch.randn(2, 5, 7)), ValueError,
     r"rope: 'cos' has 7 features .* even",
     "same"),
    (_bad(cos=torch.randn(2, 5, 10), sin=torch.randn(2, 5, 10)), RuntimeError,
     r"rope: 'cos' unsqueezed to \[2, 1, 5, 10\] does not broadcast to 'q' of shape \[2, 3, 5, 8\]", "same"),
    (_bad(cos=torch.randn(2, 4, 8), sin=torch.randn(2, 4, 8)), RuntimeError,
     r"rope: 'cos' unsqueezed to \[2, 1, 4, 8\] does not broadcast to 'q'", "same"),
    (_bad(unsqueeze_dim=3), ValueError, r"rope: unsqueeze_dim=3 is out of range for 'cos' of 3 dimensions",
     "same"),
    (_bad(unsqueeze_dim=-1), ValueError, r"rope: unsqueeze_dim=-1 is out of range .* \[-4, 2\]", "same"),
]


@pytest.mark.parametrize("args,error,match,cpp_match", BAD,
                         ids=["int-q", "qk-dtypes", "cos-dtype", "sin-shape", "odd-R", "R>D", "T-mismatch",
                              "dim-too-big", "dim-last"])
def test_bad_arguments_are_refused_naming_the_argument(args, error, match, cpp_match):
    (tensors, kw) = args
    with pytest.raises(error, match=r"torchfast\." + match):
        torchfast.rope(**tensors, **kw)
    if torchfast._ext.built() and cpp_match is not None:
        # The C++ kernel's own checks (called past the Python ones) refuse the same inputs alike.
        with pytest.raises(error, match=r"torchfast\." + (match if cpp_match == "same" else cpp_match)):
            torch.ops.torchfast.rope.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                                        *tensors.values(), **kw)
