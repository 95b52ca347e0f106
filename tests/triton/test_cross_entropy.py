"""The Triton cross-entropy kernels (torchfast/triton/cross_entropy.py): cross_entropy and
linear_cross_entropy against the references of torchfast/reference/cross_entropy.py, computed in float64
on the same inputs: losses, lse, gradients, every option and reduction, odd and strided shapes, empty
inputs, special values, chunking.

Without a GPU these run on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA. The launchers are called directly (not through the dispatcher op, which lives in
torchfast/ops/cross_entropy.py). Rows are kept short (the interpreter is slow) and MAX_BLOCK_V is lowered
to 128 so that V = 300 and 1000 span several blocks, the last one partial.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from torchfast.reference.cross_entropy import (  # noqa: E402
    cross_entropy_backward_reference,
    cross_entropy_reference,
    cross_entropy_rows_reference,
    linear_cross_entropy_reference,
)
from torchfast.testing import assert_close  # noqa: E402
from torchfast.triton import cross_entropy as tce  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean"]
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    # softcap 5 puts |x / c| on both sides of the 0.625 switch in the kernels' tanh
    "all": {"ignore_index": 0, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 5.0},
}


def _name(dtype):
    return str(dtype).split(".")[1]


@pytest.fixture(autouse=True)
def _several_blocks_per_row(monkeypatch):
    monkeypatch.setattr(tce, "MAX_BLOCK_V", 128)


def _targets(shape, v, ignore_index=-100):
    """Random classes, every fourth row ignored."""
    t = torch.randint(0, v, shape, device=DEVICE)
    t.view(-1)[::4] = ignore_index
    return t


def _check_ce(logits, target, dtype, **kw):
    """cross_entropy's loss and logits gradient against autograd of the float64 reference."""
    reduction = kw.get("reduction", "mean")
    logits = logits.detach().requires_grad_()
    loss = tce.cross_entropy(logits, target, **kw)
    assert loss.dtype == dtype and loss.shape == (target.shape if reduction == "none" else ())
    g = torch.randn(loss.shape, device=DEVICE)
    (dx,) = torch.autograd.grad(loss, logits, g.to(dtype))
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(x64, target, **kw)
    (ref_dx,) = torch.autograd.grad(ref, x64, g.to(dtype).double())
    assert_close(loss, ref, dtype=dtype, what="loss")
    assert dx.dtype == dtype and dx.shape == logits.shape
    assert_close(dx, ref_dx, dtype=dtype, what="grad logits")


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_cross_entropy_matches_reference(dtype, reduction, options):
    v = 300 if dtype == torch.float32 else 37
    logits = torch.randn(3, 4, v, device=DEVICE, dtype=dtype) * 3
    target = _targets((3, 4), v, options.get("ignore_index", -100))
    _check_ce(logits, target, dtype, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_float16(reduction):
    logits = torch.randn(4, 37, device=DEVICE, dtype=torch.float16) * 3
    _check_ce(logits, _targets((4,), 37, 0), torch.float16, reduction=reduction, **OPTIONS["all"])


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 300), (6, 1000), (1000,), (4, 1)], ids=str)
def test_cross_entropy_shapes(shape):
    logits = torch.randn(shape, device=DEVICE) * 2
    target = _targets(shape[:-1], shape[-1])
    if target.dim() == 0:
        target.fill_(7)
    _check_ce(logits, target, torch.float32, reduction="none")
    _check_ce(logits, target, torch.float32, reduction="mean", label_smoothing=0.1)


def test_lse_output():
    logits = torch.randn(2, 5, 300, device=DEVICE, dtype=torch.bfloat16) * 4
    target = _targets((2, 5), 300)
    loss, lse = tce.cross_entropy_fwd(logits, target, -100, 0.1, 1e-4, 30.0)
    ref_loss, ref_lse = cross_entropy_rows_reference(logits.double(), target, label_smoothing=0.1,
                                                     z_loss=1e-4, softcap=30.0)
    assert loss.dtype == lse.dtype == torch.float32 and lse.shape == (2, 5)
    assert_close(lse, ref_lse, dtype=torch.float32, what="lse")
    assert_close(loss, ref_loss, dtype=torch.float32, what="per-row loss")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(reduction):
    logits = torch.randn(0, 37, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = tce.cross_entropy(logits, target, reduction=reduction)
    ref = cross_entropy_reference(logits.detach(), target, reduction=reduction)
    assert_close(loss, ref, what="loss")  # mean of nothing is NaN, as F.cross_entropy gives
    (dx,) = torch.autograd.grad(loss.sum(), logits)
    assert dx.shape == (0, 37)

    hidden = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(37, 8, device=DEVICE, requires_grad=True)
    loss = tce.linear_cross_entropy(hidden, weight, target, reduction=reduction)
    ref = linear_cross_entropy_reference(hidden.detach(), weight.detach(), target, reduction=reduction)
    assert_close(loss, ref)
    dh, dw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert dh.shape == (0, 8) and torch.equal(dw, torch.zeros_like(dw))


def test_strided_logits():
    base = torch.randn(9, 320, device=DEVICE) * 3
    target = _targets((9,), 300)
    rows_with_gaps = base[:, 7:307]  # row stride 320: read in place
    assert rows_with_gaps.stride() == (320, 1)
    _check_ce(rows_with_gaps, target, torch.float32, reduction="none", softcap=30.0)
    transposed = torch.randn(300, 9, device=DEVICE).t()  # column stride 9: copied to unit stride
    _check_ce(transposed, target, torch.float32, reduction="sum", label_smoothing=0.1)
    every_other_row = base[::2, :300]
    _check_ce(every_other_row, target[:5], torch.float32, reduction="mean")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on inf - inf
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no-softcap", "softcap"])
def test_special_values_follow_the_reference(softcap):
    """-inf logits (masked classes), a row of -inf, a NaN, a +inf and huge logits: per-row loss, lse and
    gradient match the reference's values, NaN where it has NaN."""
    logits = torch.randn(6, 300, device=DEVICE) * 3
    target = torch.tensor([5, 6, 7, 8, 9, 10], device=DEVICE)
    logits[0, 100:250] = float("-inf")
    logits[1] = float("-inf")
    logits[2, 40] = float("nan")
    logits[3, 41] = float("inf")
    logits[4] = torch.linspace(-500, 500, 300)
    loss, lse = tce.cross_entropy_fwd(logits, target, -100, 0.0, 0.0, softcap)
    ref_loss, ref_lse = cross_entropy_rows_reference(logits.double(), target, softcap=softcap)
    assert_close(lse, ref_lse, dtype=torch.float32, what="lse")
    assert_close(loss, ref_loss, dtype=torch.float32, what="per-row loss")
    assert loss[5].isfinite() and loss[2].isnan() and (softcap is not None or loss[1].isnan())
    g = torch.randn(6, device=DEVICE)
    dx = tce.cross_entropy_bwd(g, logits, target, lse, -100, 0.0, 0.0, softcap)
    ref_dx = cross_entropy_backward_reference(g.double(), logits.double(), target, ref_lse, softcap=softcap)
    assert_close(dx, ref_dx, dtype=torch.float32, what="grad logits")
    assert dx[0].isfinite().all() and dx[5].isfinite().all() and dx[2].isnan().all()
    assert tce.cross_entropy(logits, target).isnan()  # a NaN row makes the mean NaN


@triton.jit
def _tanh_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    y = tl.load(y_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, tce._tanh(y), mask=offs < n)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter, on exp overflow
def test_softcap_tanh_is_accurate_to_a_few_ulp():
    """The kernels' own tanh, to fp32 relative accuracy on both sides of its 0.625 switch, including tiny
    arguments (where 1 - 2 / (exp(2y) + 1) alone would lose all relative precision) and +-inf, NaN."""
    y = torch.cat([torch.logspace(-8, 1.5, 500), torch.tensor([0.0, 0.6249, 0.625, 100.0, float("inf")])])
    y = torch.cat([y, -y, torch.tensor([float("nan")])]).to(DEVICE)
    out = torch.empty_like(y)
    _tanh_kernel[(1,)](y, out, y.numel(), BLOCK=triton.next_power_of_2(y.numel()))
    assert_close(out, torch.tanh(y.double()), rtol=4e-7, atol=0, what="tanh")


def test_target_out_of_range_gives_nan():
    logits = torch.randn(3, 37, device=DEVICE)
    target = torch.tensor([1, 37, -1], device=DEVICE)
    loss, lse = tce.cross_entropy_fwd(logits, target, -100, 0.0, 0.0, None)
    assert loss[0].isfinite() and loss[1:].isnan().all() and lse.isfinite().all()
    dx = tce.cross_entropy_bwd(torch.ones(3, device=DEVICE), logits, target, lse, -100, 0.0, 0.0, None)
    assert dx[0].isfinite().all() and dx[1:].isnan().all()


def test_double_backward():
    logits = (torch.randn(4, 37, device=DEVICE, dtype=torch.float32) * 2).requires_grad_()
    target = torch.tensor([1, -100, 30, 4], device=DEVICE)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"}
    v = torch.randn(4, 37, device=DEVICE)
    (dx,) = torch.autograd.grad(tce.cross_entropy(logits, target, **kw), logits, create_graph=True)
    (ddx,) = torch.autograd.grad((dx * v).sum(), logits)
    x64 = logits.detach().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(cross_entropy_reference(x64, target, **kw), x64, create_graph=True)
    (ref_ddx,) = torch.autograd.grad((ref_dx * v.double()).sum(), x64)
    assert_close(ddx, ref_ddx, rtol=1e-4, atol=1e-5, what="double backward")


def test_refusals():
    target = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="float64.*impl='native'"):
        tce.cross_entropy(torch.randn(2, 5, dtype=torch.float64), target)
    with pytest.raises(TypeError, match="class indices"):
        tce.cross_entropy(torch.randn(2, 5), target.float())
    with pytest.raises(RuntimeError, match="expected \\(3,\\)"):
        tce.cross_entropy(torch.randn(3, 5), target)
    with pytest.raises(ValueError, match="reduction"):
        tce.cross_entropy(torch.randn(2, 5), target, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        tce.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), target, chunk_size=0)
    with pytest.raises(TypeError, match="hidden's dtype"):
        tce.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, dtype=torch.bfloat16), target)


# ---- linear_cross_entropy -------------------------------------------------------------------------


def _linear_leaves(dtype, with_bias, v=300, hidden_grad=True):
    hidden = torch.randn(2, 5, 16, device=DEVICE, dtype=dtype).requires_grad_(hidden_grad)
    weight = (torch.randn(v, 16, device=DEVICE, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(v, device=DEVICE, dtype=dtype).requires_grad_() if with_bias else None
    return hidden, weight, bias


def _check_linear(leaves, target, dtype, **kw):
    """linear_cross_entropy's loss and gradients against autograd of the float64 reference. bf16 logits
    are rounded in the chunk buffer (as F.linear in bf16 rounds them), so bf16 gradients, sums over V or
    rows of rounded products, are compared with an absolute slack of 1% of their largest value."""
    loss = tce.linear_cross_entropy(*leaves[:2], target, leaves[2], **kw)
    g = torch.randn(loss.shape, device=DEVICE)
    params = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, params, g.to(dtype))
    leaves64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = linear_cross_entropy_reference(*leaves64[:2], target, leaves64[2], **kw)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves64 if t is not None and t.requires_grad],
                                    g.to(dtype).double())
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype=dtype, what="loss")
    for got, exp, leaf in zip(grads, ref_grads, params):
        assert got.dtype == dtype and got.shape == leaf.shape
        atol = 1e-2 * exp.abs().max().item() if dtype == torch.bfloat16 else 1e-6
        assert_close(got, exp, dtype=dtype, atol=atol, what=f"grad {tuple(leaf.shape)}")
    return loss, grads


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_linear_cross_entropy_matches_reference(dtype, with_bias, reduction):
    leaves = _linear_leaves(dtype, with_bias)
    kw = OPTIONS["all"] | {"reduction": reduction, "chunk_size": 4}  # chunks of 4, 4 and 2 rows
    _check_linear(leaves, _targets((2, 5), 300, 0), dtype, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_chunks_agree_with_one_chunk(reduction):
    leaves = _linear_leaves(torch.float32, True)
    target = _targets((2, 5), 300)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "softcap": 30.0}
    torch.manual_seed(1)
    loss3, grads3 = _check_linear(leaves, target, torch.float32, chunk_size=4, **kw)
    torch.manual_seed(1)  # the same grad_out
    loss1, grads1 = _check_linear(leaves, target, torch.float32, **kw)  # default: one chunk of 10 rows
    assert_close(loss3, loss1, what="loss, 3 chunks vs 1")
    for a, b in zip(grads3, grads1):
        assert_close(a, b, what="grad, 3 chunks vs 1")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_hidden_without_grad(reduction):
    leaves = _linear_leaves(torch.float32, True, hidden_grad=False)
    target = _targets((2, 5), 300)
    _check_linear(leaves, target, torch.float32, reduction=reduction, z_loss=1e-4, chunk_size=3)


def test_linear_without_grad_mode():
    hidden, weight, bias = _linear_leaves(torch.float32, True)
    target = _targets((2, 5), 300)
    with torch.no_grad():
        loss = tce.linear_cross_entropy(hidden, weight, target, bias, chunk_size=4)
    assert loss.grad_fn is None
    ref = linear_cross_entropy_reference(hidden.double(), weight.double(), target, bias.double())
    assert_close(loss, ref, dtype=torch.float32)


def test_default_chunk_size():
    assert tce.default_chunk_size(100_000, 128_256, torch.bfloat16) == 64 * 2**20 // (128_256 * 2)
    assert tce.default_chunk_size(10, 300, torch.float32) == 10  # at most N rows
    assert tce.default_chunk_size(10, 2**30, torch.float32) == 1  # at least one
