"""Numerics of torchfast.cross_entropy and linear_cross_entropy: against F.cross_entropy for every
argument they share, against the float64 reference for the rest (z_loss, softcap), every CPU ISA
variant, the corner cases (ignored rows, -inf / NaN logits, empty inputs) and bad input.
opcheck, gradcheck, compile and autocast run for both ops in tests/test_conformance.py."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.testing import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHARED = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
          {"label_smoothing": 0.3, "reduction": "none"}, {"ignore_index": 3}]


def _target(n, v, ignore_index=-100, every=4):
    t = torch.randint(0, v, (n,))
    t[::every] = ignore_index
    return t


def _fwd_bwd(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    y = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y, g


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_f_cross_entropy_for_shared_arguments_on_every_isa(isa, dtype, restore_cpu_isa):
    if isa != "none":
        torchfast._ext.set_cpu_isa(isa)
    # V = 5003 spans three blocks of the CPU kernel (2048), with a tail shorter than a vector.
    for v in (37, 5003):
        x = (torch.randn(23, v) * 4).to(dtype)
        for kwargs in SHARED:
            t = _target(23, v, kwargs.get("ignore_index", -100))
            y, g = _fwd_bwd(torchfast.cross_entropy, x, t, **kwargs)
            y_ref, g_ref = _fwd_bwd(F.cross_entropy, x.double(), t, **kwargs)
            assert y.dtype == dtype
            # bf16/fp16: torch computes in the low precision; compare with the float64 loss instead.
            assert_close(y, y_ref, dtype=dtype, what=f"loss V={v} {kwargs}")
            assert_close(g, g_ref, dtype=dtype, what=f"grad V={v} {kwargs}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{"z_loss": 1e-3}, {"softcap": 5.0}, {"softcap": 30.0, "z_loss": 1e-4,
                                                                        "label_smoothing": 0.1}], ids=str)
def test_z_loss_and_softcap_match_the_reference(dtype, kwargs):
    x = (torch.randn(3, 5, 2100) * 6).to(dtype)
    t = torch.randint(0, 2100, (3, 5))
    t[0, 1] = -100
    for reduction in ("mean", "none"):
        y, g = _fwd_bwd(torchfast.cross_entropy, x, t, reduction=reduction, **kwargs)
        y_ref, g_ref = _fwd_bwd(torchfast.cross_entropy, x.double(), t, reduction=reduction, impl="reference",
                                **kwargs)
        assert_close(y, y_ref, dtype=dtype)
        assert_close(g, g_ref, dtype=dtype, what="grad")


def test_z_loss_adds_lse_squared_per_token():
    x = torch.randn(8, 50, dtype=torch.float64)
    t = torch.randint(0, 50, (8,))
    plain = torchfast.cross_entropy(x, t, reduction="none")
    with_z = torchfast.cross_entropy(x, t, reduction="none", z_loss=0.5)
    assert_close(with_z - plain, 0.5 * torch.logsumexp(x, -1).square())


def test_class_last_layout_and_strided_logits():
    x = torch.randn(2, 3, 40, 100)[..., ::2]  # [..., V] with V = 50, strided rows
    t = torch.randint(0, 50, (2, 3, 40))
    y, g = _fwd_bwd(torchfast.cross_entropy, x, t, reduction="none")
    y_ref, g_ref = _fwd_bwd(F.cross_entropy, x.double().reshape(-1, 50), t.reshape(-1), reduction="none")
    assert_close(y, y_ref.reshape(2, 3, 40), dtype=torch.float32)
    assert_close(g, g_ref.reshape(g.shape), dtype=torch.float32, what="grad")


def test_int32_target_is_accepted():
    x, t = torch.randn(6, 9), torch.randint(0, 9, (6,))
    assert_close(torchfast.cross_entropy(x, t.int()), F.cross_entropy(x.double(), t), dtype=torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_and_empty_inputs_match_torch(reduction):
    x = torch.randn(5, 7)
    t = torch.full((5,), -100)
    y, g = _fwd_bwd(torchfast.cross_entropy, x, t, reduction=reduction)
    y_ref, g_ref = _fwd_bwd(F.cross_entropy, x, t, reduction=reduction)
    assert_close(y, y_ref)  # mean: NaN, as torch gives (0 / 0)
    assert_close(g, g_ref, what="grad")
    e, te = torch.randn(0, 7), torch.zeros(0, dtype=torch.long)
    assert_close(torchfast.cross_entropy(e, te, reduction=reduction), F.cross_entropy(e, te, reduction=reduction))


def test_infinities_and_nan_propagate_like_torch():
    x = torch.randn(6, 3000, dtype=torch.float64)
    x[0, :2500] = float("-inf")  # first block all -inf: must not turn the row into NaN
    x[1, 7] = float("-inf")      # the target's logit is -inf: loss +inf
    x[2, 100] = float("nan")
    x[3, 5] = float("inf")
    x[4, :] = float("-inf")      # every logit -inf: NaN, as torch gives
    t = torch.tensor([2600, 7, 1, 2, 3, 4])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        y, g = _fwd_bwd(torchfast.cross_entropy, x.to(dtype), t, reduction="none")
        y_ref, g_ref = _fwd_bwd(F.cross_entropy, x, t, reduction="none")
        assert_close(y, y_ref, dtype=dtype)
        assert_close(g[[0, 2, 4, 5]], g_ref[[0, 2, 4, 5]], dtype=dtype, what="grad")
        assert g[2].isnan().all()


def test_out_of_range_target_raises_like_torch():
    x = torch.randn(4, 10)
    for bad in (10, -1, -5):
        t = torch.tensor([1, bad, 2, 3])
        with pytest.raises(IndexError, match="out of bounds"):
            F.cross_entropy(x, t)
        with pytest.raises(IndexError, match=r"torchfast.cross_entropy: target .* out of bounds for 10 classes"):
            torchfast.cross_entropy(x, t)
        with pytest.raises(IndexError, match="torchfast.linear_cross_entropy: target"):
            torchfast.linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), t)


@pytest.mark.parametrize("case, error, match", [
    ("float_target", TypeError, "argument 'target' has dtype torch.float32; expected class indices"),
    ("target_shape", RuntimeError, "argument 'target' has shape .5,. but 'logits' has shape .4, 10."),
    ("empty_vocab", RuntimeError, "its last dimension .the classes. is empty"),
    ("int_logits", TypeError, "argument 'logits' has dtype torch.int64"),
    ("reduction", ValueError, "reduction must be one of"),
    ("label_smoothing", ValueError, "label_smoothing must be in .0, 1."),
    ("softcap", ValueError, "softcap must be None or a finite number > 0"),
    ("target_device", RuntimeError, "'logits' is on cpu but 'target' is on meta"),
])
def test_bad_input_errors_name_the_op_and_argument(case, error, match):
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    x0, t0 = x.clone(), t.clone()
    args, kwargs = (x, t), {}
    if case == "float_target":
        args = (x, t.float())
    elif case == "target_shape":
        args = (x, torch.randint(0, 10, (5,)))
    elif case == "empty_vocab":
        args = (torch.randn(4, 0), t)
    elif case == "int_logits":
        args = (t.reshape(4, 1).expand(4, 10).contiguous(), t)
    elif case == "target_device":
        args = (x, t.to("meta"))
    else:
        kwargs = {"reduction": {"reduction": "avg"}, "label_smoothing": {"label_smoothing": 1.5},
                  "softcap": {"softcap": 0.0}}[case]
    with pytest.raises(error, match=match):
        torchfast.cross_entropy(*args, **kwargs)
    assert torch.equal(x, x0) and torch.equal(t, t0)  # nothing modified


@pytest.mark.parametrize("case, error, match", [
    ("hidden_size", RuntimeError, "argument 'weight' has shape .50, 7. but 'hidden' has shape .6, 8.; weight "
     "must be .vocab, 8."),
    ("weight_device", RuntimeError, "'hidden' is on cpu but 'weight' is on meta"),
    ("bias_shape", RuntimeError, "argument 'bias' has shape .49,.; expected .50."),
    ("weight_dtype", TypeError, "'weight' has dtype torch.float64 but 'hidden' has dtype torch.float32"),
    ("target_shape", RuntimeError, "argument 'target' has shape .7,. but 'hidden' has shape .6, 8."),
    ("empty_vocab", RuntimeError, "the vocabulary .its first dimension. is empty"),
    ("chunk_size", ValueError, "chunk_size must be a positive int"),
])
def test_linear_bad_input_errors(case, error, match):
    h, w, t, b = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,)), None
    kwargs = {}
    if case == "hidden_size":
        w = torch.randn(50, 7)
    elif case == "weight_device":
        w = w.to("meta")
    elif case == "bias_shape":
        b = torch.randn(49)
    elif case == "weight_dtype":
        w = w.double()
    elif case == "target_shape":
        t = torch.randint(0, 50, (7,))
    elif case == "empty_vocab":
        w = torch.randn(0, 8)
    elif case == "chunk_size":
        kwargs = {"chunk_size": 0}
    with pytest.raises(error, match=match):
        torchfast.linear_cross_entropy(h, w, t, b, **kwargs)


def _linear_ref(h, w, t, b=None, **kwargs):
    kwargs.pop("chunk_size", None)
    return torchfast.cross_entropy(F.linear(h, w, b), t, impl="reference", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum", "chunk_size": 7}, {"reduction": "none", "chunk_size": 5},
                                    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 15.0, "chunk_size": 4}],
                         ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_linear_then_cross_entropy(dtype, kwargs, bias):
    h = torch.randn(3, 9, 64).to(dtype).requires_grad_()
    w = (torch.randn(700, 64) * 0.2).to(dtype).requires_grad_()
    b = torch.randn(700).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, 700, (3, 9))
    t[1, ::3] = -100
    leaves = [h, w] + ([b] if bias else [])
    y = torchfast.linear_cross_entropy(h, w, t, b, **kwargs)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    ref_leaves = [a.detach().double().requires_grad_() for a in leaves]
    y_ref = _linear_ref(*ref_leaves[:2], t, *ref_leaves[2:], **dict(kwargs))
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, torch.ones_like(y_ref))
    # bf16: the logits themselves are rounded to bf16 by the GEMM, as F.linear's are: a looser bound.
    tol = {} if dtype == torch.float32 else {"rtol": 4e-2, "atol": 2e-2}
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype=dtype, **tol)
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, gr, dtype=dtype, what=f"grad {name}", **tol)


def test_chunk_size_changes_nothing_but_memory():
    h, w = torch.randn(50, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    results = []
    for chunk in (1, 7, 50, 1000):
        y = torchfast.linear_cross_entropy(h, w, t, chunk_size=chunk)
        results.append((y, *torch.autograd.grad(y, (h, w))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ chunk loop is in torchfast._C")
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
def test_float32_chunk_gemms_on_either_library(onednn):
    """The float32 chunk GEMMs go through oneDNN (mkldnn::_linear_pointwise) exactly when the process-wide
    choice says so, and both libraries give the float64 result. 256 x 256 x 300 is above the size where
    oneDNN is used at all (2^24 multiply-adds)."""
    from torch.profiler import ProfilerActivity, profile

    from torchfast._ext import _C

    before = _C._onednn_matmul()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(256, 256, generator=g, requires_grad=True)
    w = (torch.randn(300, 256, generator=g) * 0.1).requires_grad_()
    b = torch.randn(300, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (256,), generator=g)
    try:
        _C._set_onednn_matmul(onednn)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = torchfast.linear_cross_entropy(h, w, t, b, chunk_size=256)
        grads = torch.autograd.grad(y, (h, w, b))
    finally:
        _C._set_onednn_matmul(before)
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls == (2 if onednn else 0)  # the logits GEMM and the grad_hidden GEMM of the one chunk
    ref = [x.detach().double().requires_grad_() for x in (h, w, b)]
    y_ref = F.cross_entropy(F.linear(*ref), t)
    for got, want, what in zip((y, *grads), (y_ref, *torch.autograd.grad(y_ref, ref)), ("loss", "hidden", "weight", "bias")):
        assert_close(got.double(), want, rtol=1e-5, atol=1e-6, what=what)


def test_tied_weight_hidden_without_grad_and_no_grad_mode():
    emb = torch.nn.Embedding(100, 16)
    tokens = torch.randint(0, 100, (12,))
    t = torch.randint(0, 100, (12,))

    def step(loss_fn):
        emb.zero_grad()
        h = emb(tokens) * 2.0
        loss_fn(h, emb.weight, t).backward()
        return emb.weight.grad.clone()

    g = step(torchfast.linear_cross_entropy)
    g_ref = step(lambda h, w, t: F.cross_entropy(F.linear(h, w), t))
    assert_close(g, g_ref, rtol=1e-5, atol=1e-6, what="tied weight grad (embedding + head)")
    # hidden that does not require grad: only the weight's gradient is computed.
    h = torch.randn(12, 16)
    w = torch.randn(100, 16, requires_grad=True)
    (gw,) = torch.autograd.grad(torchfast.linear_cross_entropy(h, w, t), (w,))
    (gw_ref,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), (w,))
    assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y = torchfast.linear_cross_entropy(h, w, t)
    assert not y.requires_grad
    assert_close(y, F.cross_entropy(F.linear(h, w), t).detach())


def test_linear_cross_entropy_under_autocast_with_fp32_master_weight():
    h = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(200, 32, requires_grad=True)
    t = torch.randint(0, 200, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torchfast.linear_cross_entropy(h, w, t)
        y_ref = F.cross_entropy(F.linear(h, w), t)
    g = torch.autograd.grad(y, (h, w))
    g_ref = torch.autograd.grad(y_ref, (h, w))
    assert y.dtype == torch.float32 and g[1].dtype == torch.float32
    assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        assert_close(a, b, rtol=5e-2, atol=5e-3, what="grad")


def test_reduction_none_backward_takes_per_row_gradients():
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (10,))
    weights = torch.rand(10, dtype=torch.float64)
    y = torchfast.linear_cross_entropy(h, w, t, reduction="none", chunk_size=3)
    g = torch.autograd.grad((y * weights).sum(), (h, w))
    y_ref = _linear_ref(h, w, t, reduction="none")
    g_ref = torch.autograd.grad((y_ref * weights).sum(), (h, w))
    for a, b in zip(g, g_ref):
        assert_close(a, b)


def test_cross_entropy_keeps_no_log_softmax():
    """Saved for backward: the logits (the caller's tensor) and one float per row, nothing [N, V]."""
    x = torch.randn(64, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (64,))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        torchfast.cross_entropy(x, t)
    new_bytes = sum(s.numel() * s.element_size() for s in saved if s.data_ptr() != x.data_ptr())
    # target (int64) and lse (fp32) per row, and the mean's 0-d divisor: nothing of size [64, 1000].
    assert new_bytes <= 64 * 8 + 64 * 4 + 64


def test_opcheck_linear_cross_entropy_with_gradients_in_the_forward():
    """The conformance suite's samples leave grad_mask off; here the op computes the gradients."""
    from torch.library import opcheck

    h = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    t = _target(7, 37)
    for reduction in ("mean", "sum"):
        opcheck(torch.ops.torchfast.linear_cross_entropy.default, (h, w, t, b),
                {"reduction": reduction, "chunk_size": 3, "grad_mask": 7})
    outs = torch.ops.torchfast.linear_cross_entropy(h, w, t, b, chunk_size=3, grad_mask=5)
    ref = torch.autograd.grad(_linear_ref(h, w, t, b), (h, b))
    assert outs[3].numel() == 0  # not asked for
    assert_close(outs[2], ref[0], rtol=1e-5, atol=1e-6, what="grad_hidden")
    assert_close(outs[4], ref[1], rtol=1e-5, atol=1e-6, what="grad_bias")


def test_default_chunk_size_bounds_the_logits_buffer():
    """The CPU default: a [chunk, V] buffer of about 8 MiB but never under 128 rows (the GEMMs slow
    down below that), and never more rows than there are tokens."""
    from torchfast.ops.cross_entropy import CHUNK_BYTES, CHUNK_MIN_ROWS, LARGE_MIN_ROWS, default_chunk_size

    assert default_chunk_size(4096, 32000, torch.float32) == CHUNK_MIN_ROWS == 128  # 16 MiB, not 65 rows
    assert default_chunk_size(4096, 128256, torch.bfloat16) == LARGE_MIN_ROWS == 256  # a 250 KiB row
    assert default_chunk_size(4096, 128256, torch.float32) == 256
    assert default_chunk_size(4096, 100_000, torch.bfloat16) == 128  # 195 KiB rows: not "large"
    assert default_chunk_size(100, 128256, torch.bfloat16) == 100
    assert default_chunk_size(100_000, 4000, torch.float32) == 512  # 8 MiB fit 524 rows: a multiple of 32
    assert default_chunk_size(4096, 32000, torch.bfloat16) == 128  # 131 rows fit: 4096 splits into 32
    assert all(default_chunk_size(10**6, v, torch.float32) * v * 4 <= CHUNK_BYTES for v in (1000, 4000, 16000))
    assert default_chunk_size(10, 4000, torch.float32) == 10
    assert default_chunk_size(0, 4000, torch.float32) == 1


# ---- linear_cross_entropy's two logits layouts --------------------------------------------------------
# bfloat16/float16 chunks keep their logits as [V, chunk] and run the column kernels (ce_fwd_cols /
# ce_bwd_cols); float32/float64 keep [chunk, V] and the row kernels. TORCHFAST_CE_LOGITS_LAYOUT forces
# either, so both kernels are checked here in every dtype against the float64 reference.

LAYOUTS = ["rows", "columns"]


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ chunk loop is in torchfast._C")
@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_logits_layouts_match_the_reference_on_every_isa(isa, layout, dtype, monkeypatch, restore_cpu_isa):
    """70 tokens in chunks of 40 and 64: full 32-token groups, partial ones (8 and 6 tokens) and a
    chunk smaller than one group (chunk 16); V = 300 spans five 64-class blocks with a tail."""
    monkeypatch.setenv("TORCHFAST_CE_LOGITS_LAYOUT", layout)
    if isa != "none":
        torchfast._ext.set_cpu_isa(isa)
    g = torch.Generator().manual_seed(11)
    h = torch.randn(70, 24, generator=g).to(dtype)
    w = (torch.randn(300, 24, generator=g) * 0.5).to(dtype)
    b = (torch.randn(300, generator=g) * 0.1).to(dtype)
    t = torch.randint(0, 300, (70,), generator=g)
    t[::9] = -100
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {}
    if dtype in (torch.bfloat16, torch.float16):  # the GEMMs round the logits (and dlogits), as F.linear's are
        tol = {"rtol": 4e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-2, "atol": 5e-3}
    for kwargs in ({"chunk_size": 40}, {"chunk_size": 64, "label_smoothing": 0.1, "z_loss": 1e-3},
                   {"chunk_size": 16, "softcap": 3.0, "reduction": "sum"}, {"chunk_size": 40, "reduction": "none"}):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        y = torchfast.linear_cross_entropy(*leaves[:2], t, leaves[2], **kwargs)
        gy = torch.rand(y.shape, generator=g, dtype=torch.float64) + 0.5
        grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
        ref = [x.detach().double().requires_grad_() for x in leaves]
        y_ref = _linear_ref(*ref[:2], t, ref[2], **dict(kwargs))
        grads_ref = torch.autograd.grad(y_ref, ref, gy)
        assert_close(y, y_ref, dtype=dtype, what=f"loss {layout} {kwargs}", **tol)
        for name, got, want in zip(("hidden", "weight", "bias"), grads, grads_ref):
            assert_close(got, want, dtype=dtype, what=f"grad {name} {layout} {kwargs}", **tol)
    # hidden without grad: the column layout's copy of h_c for grad_weight then has no grad_hidden rows
    # to live in (a buffer of its own); and grad_bias alone.
    for wanted in ((1, 2), (2,)):
        leaves = [x.clone().requires_grad_(i in wanted) for i, x in enumerate((h, w, b))]
        y = torchfast.linear_cross_entropy(*leaves[:2], t, leaves[2], chunk_size=40)
        grads = torch.autograd.grad(y, [leaves[i] for i in wanted])
        ref = [x.detach().double().requires_grad_(i in wanted) for i, x in enumerate((h, w, b))]
        grads_ref = torch.autograd.grad(_linear_ref(*ref[:2], t, ref[2]), [ref[i] for i in wanted])
        for i, got, want in zip(wanted, grads, grads_ref):
            assert_close(got, want, dtype=dtype, what=f"grad {('hidden', 'weight', 'bias')[i]} alone {layout}", **tol)


def _special_logits_inputs(dtype, specials):
    """hidden and weight whose product is the logits X (finite, random) with the given (token, classes,
    value) entries replaced by -inf, +inf or NaN. A GEMM cannot take such values from its inputs (0 * inf
    is NaN, spreading to every token), so they come from overflow: each token has a value channel (h = 1,
    weight = X) and two channels of h = BIG whose weight is +-BIG where X is infinite (NaN: +BIG and -BIG,
    inf - inf)."""
    big = 1e200 if dtype == torch.float64 else 1e30
    n, v = 40, 300
    x = torch.randn(n, v, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    h = torch.zeros(n, 3 * n, dtype=torch.float64)
    w = torch.zeros(v, 3 * n, dtype=torch.float64)
    x = x.to(dtype).double()  # the values the low-precision GEMM sees
    for i in range(n):
        h[i, 3 * i], h[i, 3 * i + 1], h[i, 3 * i + 2] = 1, big, big
    w[:, 0::3] = x.t()
    for i, cls, value in specials:
        x[i, cls] = value
        w[cls, 3 * i] = 0
        if value != value:  # NaN
            w[cls, 3 * i + 1], w[cls, 3 * i + 2] = big, -big
        else:
            w[cls, 3 * i + 1] = big if value > 0 else -big
    return h.to(dtype), w.to(dtype), x


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ chunk loop is in torchfast._C")
@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_linear_logits_layouts_propagate_infinities_and_nan_like_torch(isa, layout, dtype, monkeypatch,
                                                                      restore_cpu_isa):
    monkeypatch.setenv("TORCHFAST_CE_LOGITS_LAYOUT", layout)
    if isa != "none":
        torchfast._ext.set_cpu_isa(isa)
    inf, nan = float("inf"), float("nan")
    t = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(6))
    t[::7] = -100
    t[0], t[1] = 200, 7
    # Finite lse: token 0's first 150 classes (three 64-class blocks) are -inf, token 1's target is -inf.
    finite = [(0, c, -inf) for c in range(150)] + [(1, 7, -inf), (1, 299, -inf)]
    h, w, x = _special_logits_inputs(dtype, finite)
    w.requires_grad_()
    y = torchfast.linear_cross_entropy(h, w, t, reduction="none", chunk_size=40)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    xr = x.clone().requires_grad_()
    y_ref = F.cross_entropy(xr, t, reduction="none")
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), (xr,))
    assert_close(y, y_ref, dtype=dtype, what=f"loss {layout}")
    assert y[1] == inf
    # grad_weight's value channel of token i is d loss_i / d logits[i, :] (h = 1 there, 0 for the others).
    assert_close(gw[:, 0::3].t(), gx_ref, dtype=dtype, what=f"d loss / d logits {layout}")
    # NaN or +inf in a token's logits: lse and loss NaN; every logit of an all -inf token: lse -inf,
    # loss NaN; their gradients NaN whatever the incoming gradient (F.cross_entropy's answers).
    t[2:5] = torch.tensor([100, 3, 4])
    bad = [(2, 100, nan), (3, 5, inf)] + [(4, c, -inf) for c in range(300)]
    h, w, x = _special_logits_inputs(dtype, bad)
    h.requires_grad_()
    y = torchfast.linear_cross_entropy(h, w, t, reduction="none", chunk_size=40)
    (gh,) = torch.autograd.grad(y.sum(), (h,))
    y_ref = F.cross_entropy(x, t, reduction="none")
    assert_close(y, y_ref, dtype=dtype, what=f"loss {layout}")
    assert y[2:5].isnan().all() and y_ref[2:5].isnan().all()
    assert gh[2:5].isnan().all()
    ok = torch.ones(40, dtype=torch.bool)
    ok[2:5] = False
    assert gh[ok].isfinite().all()  # the NaN columns stay in their tokens


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ chunk loop is in torchfast._C")
def test_linear_logits_layout_default_and_bad_setting(monkeypatch):
    """The default is the column layout for bfloat16/float16 and the row layout for float32/float64:
    each gives bit for bit what forcing that layout gives. A bad setting is refused by name."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.3
    t = torch.randint(0, 500, (64,), generator=g)

    def run(dtype, layout):
        if layout is None:
            monkeypatch.delenv("TORCHFAST_CE_LOGITS_LAYOUT", raising=False)
        else:
            monkeypatch.setenv("TORCHFAST_CE_LOGITS_LAYOUT", layout)
        hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        y = torchfast.linear_cross_entropy(hh, ww, t, chunk_size=48)
        return (y, *torch.autograd.grad(y, (hh, ww)))

    for dtype, layout in ((torch.bfloat16, "columns"), (torch.float16, "columns"), (torch.float32, "rows"),
                          (torch.float64, "rows")):
        for a, b in zip(run(dtype, None), run(dtype, layout)):
            assert torch.equal(a, b), (dtype, layout)
    monkeypatch.setenv("TORCHFAST_CE_LOGITS_LAYOUT", "cols")
    with pytest.raises(ValueError, match="linear_cross_entropy.*TORCHFAST_CE_LOGITS_LAYOUT.*'rows' or 'columns'"):
        torchfast.linear_cross_entropy(h, w, t)
