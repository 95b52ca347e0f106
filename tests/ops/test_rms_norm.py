"""Numerics and operator behaviour of torchfast.rms_norm and torchfast.add_rms_norm, and of the
modules torchfast.nn.RMSNorm / AddRMSNorm, on every available device, dtype and layout."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops.rms_norm import add_rms_norm_reference, rms_norm_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES
from .norm_helpers import (
    DTYPES,
    LOW,
    ops_run_during,
    reference_grads,
    saved_tensors_of,
    sum_atol,
    tensors,
)

SPEC = torchfast.REGISTRY["rms_norm"]
ADD_SPEC = torchfast.REGISTRY["add_rms_norm"]
SAMPLE_IDS = ["2d", "no_weight", "3d", "one_elem", "strided", "empty_batch", "fp32_weight"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_rms_norm_forward_backward_match_float64_reference(device, dtype, case):
    samples = SPEC.sample_inputs(device, dtype)
    if case >= len(samples):
        pytest.skip("fp32 weights are the AMP case of bf16/fp16 activations")
    args, kwargs = samples[case]
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    y = torchfast.rms_norm(*leaves, **kwargs)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, tensors(leaves), g) if y.numel() else [torch.zeros_like(t) for t in tensors(leaves)]
    (ref_y,), ref_grads = reference_grads(rms_norm_reference, leaves, kwargs, [g])
    assert y.dtype == dtype and y.shape == args[0].shape and y.is_contiguous()
    assert_close(y, ref_y, dtype=dtype)
    for name, got, ref, leaf in zip(("x", "weight"), grads, ref_grads, tensors(leaves)):
        assert got.dtype == leaf.dtype, name  # weight gradient in the weight's dtype (fp32 under AMP)
        assert_close(got, ref, dtype=got.dtype, what=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_add_rms_norm_forward_backward_match_float64_reference(device, dtype, case):
    samples = ADD_SPEC.sample_inputs(device, dtype)
    if case >= len(samples):
        pytest.skip("fp32 weights are the AMP case of bf16/fp16 activations")
    args, kwargs = samples[case]
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    y, h = torchfast.add_rms_norm(*leaves, **kwargs)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    outs = [o for o in (y, h)]
    if y.numel():
        grads = torch.autograd.grad(outs, tensors(leaves), [gy, gh])
    else:
        grads = [torch.zeros_like(t) for t in tensors(leaves)]
    (ref_y, ref_h), ref_grads = reference_grads(_add_reference_rounding_h(dtype), leaves, kwargs, [gy, gh])
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == args[0].shape
    assert_close(h, ref_h, dtype=dtype, what="h")
    assert_close(y, ref_y, dtype=dtype)
    for name, got, ref in zip(("x", "residual", "weight"), grads, ref_grads):
        assert_close(got, ref, dtype=got.dtype, what=f"grad {name}")


def _add_reference_rounding_h(dtype):
    """The float64 reference, with h rounded to the activations' dtype as the op's contract says (h is
    an output, and what is normalized); the rounding passes gradients through unchanged."""

    def reference(x, residual, weight=None, *, eps):
        h = (x + residual).to(dtype).double()
        return add_rms_norm_reference(h, torch.zeros_like(h), weight, eps=eps)

    return reference


def test_add_rms_norm_equals_add_then_rms_norm_bitwise():
    """h is rounded before it is normalized, so the fused op gives exactly what the unfused code gives
    with torchfast's own rms_norm."""
    for dtype in (torch.float32, torch.bfloat16):
        x, r = torch.randn(9, 300, dtype=dtype), torch.randn(9, 300, dtype=dtype)
        w = torch.randn(300)
        y, h = torchfast.add_rms_norm(x, r, w.to(dtype), eps=1e-5)
        assert torch.equal(h, x + r)
        assert torch.equal(y, torchfast.rms_norm(x + r, w.to(dtype), eps=1e-5))


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_variant_matches_reference(isa, dtype, restore_cpu_isa):
    """Each compiled ISA variant, forward and backward of both ops; 1003-wide rows leave a tail after
    the vectors, 257 rows split unevenly across threads and into backward's blocks of rows."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    x, r, g = (torch.randn(257, 1003, dtype=dtype) for _ in range(3))
    w = torch.rand(1003, dtype=torch.float32 if dtype in LOW else dtype) + 0.5
    leaves = [x.requires_grad_(), w.requires_grad_()]
    y = torchfast.rms_norm(*leaves, eps=1e-6)
    grads = torch.autograd.grad(y, leaves, g)
    (ref_y,), ref_grads = reference_grads(rms_norm_reference, leaves, {"eps": 1e-6}, [g])
    assert_close(y, ref_y, dtype=dtype)
    assert_close(grads[0], ref_grads[0], dtype=dtype, what="grad x")
    terms = g.double() * x.detach().double() * torch.rsqrt(x.detach().double().square().mean(-1, keepdim=True))
    assert_close(grads[1], ref_grads[1], dtype=w.dtype, atol=sum_atol(terms, w.dtype), what="grad weight")
    y2, h = torch.ops.torchfast.add_rms_norm(x.detach(), r, w.detach(), 1e-6)[:2]
    assert torch.equal(h, x.detach() + r)
    assert_close(y2, rms_norm_reference(h.double(), w.double()), dtype=dtype)


def test_all_zero_rows_are_finite_and_special_values_stay_in_their_row():
    x = torch.randn(5, 64)
    x[0] = 0.0
    x[2, 3] = float("nan")
    x[3, 7] = float("inf")
    w = torch.randn(64, requires_grad=True)
    xr = x.clone().requires_grad_()
    y = torchfast.rms_norm(xr, w, eps=1e-6)
    ref = F.rms_norm(x.double(), (64,), w.double(), 1e-6)
    assert torch.equal(y[0], torch.zeros(64))  # 0 * rsqrt(eps): finite, like the reference
    assert torch.equal(y.isnan(), ref.isnan())  # the inf row is inf * 0 = NaN there too
    assert_close(y[[1, 4]], ref[[1, 4]], dtype=torch.float32)
    g = torch.randn(5, 64)
    dx, _ = torch.autograd.grad(y, [xr, w], g)
    x64 = x.double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(F.rms_norm(x64, (64,), w.double(), 1e-6), [x64], g.double())
    assert dx[[0, 1, 4]].isfinite().all()
    assert_close(dx[[0, 1, 4]], ref_dx[[0, 1, 4]], dtype=torch.float32, what="grad x")
    # eps=0 on an all-zero row is 0/0, as in the reference
    assert torchfast.rms_norm(torch.zeros(1, 8), eps=0.0).isnan().all()


def test_weight_gradient_sums_many_rows_in_fp32_and_is_deterministic():
    """6000 rows of bf16 with an fp32 weight: the weight gradient is a sum over every row, accumulated
    in fp32 per chunk of rows and then across chunks; two runs give identical bits."""
    x = torch.randn(6000, 96, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    w = torch.rand(96) + 0.5
    rstd = torch.ops.torchfast.rms_norm(x, w, 1e-6)[1]
    dx1, dw1 = torch.ops.torchfast.rms_norm_backward(g, x, w, rstd)
    dx2, dw2 = torch.ops.torchfast.rms_norm_backward(g, x, w, rstd)
    assert torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    ref_dw = (g.double() * x.double() * rstd.double().unsqueeze(-1)).sum(0)
    assert dw1.dtype == torch.float32
    assert_close(dw1, ref_dw, dtype=torch.float32, rtol=1e-5, atol=1e-4)


def test_stats_are_fp32_and_fp64_for_double():
    for dtype, stats in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                         (torch.float32, torch.float32), (torch.float64, torch.float64)):
        x = torch.randn(2, 3, 8, dtype=dtype)
        _, rstd = torch.ops.torchfast.rms_norm(x, None, 1e-6)
        assert rstd.dtype == stats and rstd.shape == (2, 3)
        assert_close(rstd, torch.rsqrt(x.double().square().mean(-1) + 1e-6), dtype=torch.float32)


def test_backward_saves_x_and_rstd_only():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    saved, y = saved_tensors_of(lambda: torchfast.rms_norm(x, w))
    new = [t for t in saved if t is not w]  # the weight is a parameter: no memory of its own
    assert new[0] is x and [tuple(t.shape) for t in new] == [(64, 32), (64,)]
    assert sum(t.numel() * t.element_size() for t in new) == x.numel() * 4 + 64 * 4
    y.sum().backward()


def test_add_rms_norm_saves_h_not_x_or_residual():
    x, r = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    saved, (y, h) = saved_tensors_of(lambda: torchfast.add_rms_norm(x, r, w))
    new = [t for t in saved if t is not w]
    assert not any(t is x or t is r for t in new)
    assert [tuple(t.shape) for t in new] == [(16, 32), (16,)] and torch.equal(new[0], h)
    (y.sum() + h.sum()).backward()
    assert torch.equal(x.grad, r.grad)


def test_backward_runs_the_backward_ops():
    x = torch.randn(4, 8, requires_grad=True)
    y = torchfast.rms_norm(x, torch.ones(8))
    assert torch.ops.torchfast.rms_norm_backward.default in ops_run_during(lambda: y.sum().backward())
    y, h = torchfast.add_rms_norm(x, x.detach(), torch.ones(8))
    assert torch.ops.torchfast.add_rms_norm_backward.default in ops_run_during(lambda: (y.sum() + h.sum()).backward())


def test_compiled_model_graphs_hold_the_fused_ops():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torchfast.nn.RMSNorm(16)
            self.add_norm = torchfast.nn.AddRMSNorm(16)
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            y, h = self.add_norm(self.lin(self.norm(x)), x)
            return y + h

    model, x = Block(), torch.randn(5, 16)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    backend = AotEagerAndRecordGraphs()
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager, dtype=torch.float32)
    for got, ref in zip(grads, eager_grads):
        assert_close(got, ref, dtype=torch.float32, what="grad")
    for op in ("rms_norm", "add_rms_norm"):
        assert f"torchfast.{op}.default" in backend.fw_graphs[0].code
        assert f"torchfast.{op}_backward.default" in backend.bw_graphs[0].code


def test_modules_match_torch_nn_rmsnorm():
    for shape, eps, affine in (((24,), None, True), ((3, 8), 1e-5, True), ((24,), 1e-6, False)):
        ours, theirs = torchfast.nn.RMSNorm(shape, eps, affine), torch.nn.RMSNorm(shape, eps, affine)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        if affine:
            theirs.weight.data.uniform_(0.5, 1.5)
            ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 5, 24).reshape(2, 5, *shape)
        assert_close(ours(x), theirs.double()(x.double()), dtype=torch.float32)
        add = torchfast.nn.AddRMSNorm(shape, eps, affine)
        add.load_state_dict(theirs.state_dict())
        y, h = add(x, x)
        assert_close(y, theirs(2 * x.double()), dtype=torch.float32)
        assert torch.equal(h, 2 * x)


def test_amp_bf16_activations_keep_fp32_weight_under_autocast():
    """Under torch.autocast(cpu, bf16): the linear gives bf16, the norm takes it with its fp32 weight as
    they are (no cast of either), returns bf16, and the weight gradient is fp32."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torchfast.nn.RMSNorm(64), torch.nn.Linear(64, 8))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        assert h.dtype == torch.bfloat16
        ops = ops_run_during(lambda: model[1](h))
        y = model[1](h)
        out = model[2](y)
    assert y.dtype == torch.bfloat16
    assert torch.ops.torchfast.rms_norm.default in ops
    assert not {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype} & set(ops), ops
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32
    ref = rms_norm_reference(h.double(), model[1].weight.double())
    assert_close(y, ref, dtype=torch.bfloat16)


def test_autocast_casts_only_what_the_kernels_refuse():
    x32 = torch.randn(4, 16)
    w16 = torch.randn(16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"torchfast\.rms_norm: argument 'weight' has dtype torch\.bfloat16"):
        torchfast.rms_norm(x32, w16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torchfast.rms_norm(x32, w16)  # fp32 activations stay fp32; the bf16 weight is widened
        yh, h = torchfast.add_rms_norm(x32.bfloat16(), x32, torch.ones(16))  # promoted, like torch's add
    assert y.dtype == torch.float32
    assert_close(y, rms_norm_reference(x32.double(), w16.double()), dtype=torch.float32)
    assert yh.dtype == h.dtype == torch.float32 and torch.equal(h, x32.bfloat16().float() + x32)


def test_impl_selection_and_reference_agree():
    x, w = torch.randn(6, 40), torch.randn(40)
    assert_close(torchfast.rms_norm(x, w, impl="native"), torchfast.rms_norm(x, w, impl="reference").double(),
                 dtype=torch.float32)
    with torchfast.use_impl("reference"):
        y, h = torchfast.add_rms_norm(x, x, w)
    assert_close(y, torchfast.add_rms_norm(x, x, w)[0].double(), dtype=torch.float32)
    assert_close(torchfast.rms_norm(x, eps=None), F.rms_norm(x.double(), (40,), eps=torch.finfo(torch.float32).eps),
                 dtype=torch.float32)


BAD = [
    (lambda: torchfast.rms_norm(torch.randn(3, 4), torch.ones(5)), RuntimeError,
     r"torchfast\.rms_norm: argument 'weight' has shape \(5,\) but x's last dimension has size 4"),
    (lambda: torchfast.rms_norm(torch.randn(3, 4), torch.ones(2, 2)), RuntimeError,
     r"'weight' must be 1-D with 4 elements"),
    (lambda: torchfast.rms_norm(torch.randn(3, 4), eps=-1e-6), ValueError,
     r"torchfast\.rms_norm: eps must be a finite number >= 0.*got -1e-06"),
    (lambda: torchfast.rms_norm(torch.ones(3, 4, dtype=torch.int64)), TypeError,
     r"torchfast\.rms_norm: argument 'x' has dtype torch\.int64"),
    (lambda: torchfast.rms_norm(torch.ones(3, 4), torch.ones(4, dtype=torch.int32)), TypeError,
     r"torchfast\.rms_norm: argument 'weight' has dtype torch\.int32"),
    (lambda: torchfast.rms_norm(torch.ones(3, 0)), RuntimeError,
     r"torchfast\.rms_norm: argument 'x' has shape \(3, 0\): its last dimension is empty"),
    (lambda: torchfast.rms_norm(torch.tensor(1.0)), RuntimeError,
     r"torchfast\.rms_norm: argument 'x' must have at least one dimension"),
    (lambda: torchfast.rms_norm(torch.ones(3, 4, dtype=torch.float64), torch.ones(4)), TypeError,
     r"'weight' has dtype torch\.float32 but 'x' has dtype torch\.float64"),
    (lambda: torchfast.add_rms_norm(torch.ones(3, 4), torch.ones(3, 5)), RuntimeError,
     r"torchfast\.add_rms_norm: 'residual' has shape \(3, 5\) but 'x' has shape \(3, 4\)"),
    (lambda: torchfast.nn.RMSNorm((3, 4))(torch.ones(2, 4, 3)), RuntimeError,
     r"torchfast\.nn\.RMSNorm: expected input with trailing dimensions \[3, 4\].*got shape \[2, 4, 3\]"),
    (lambda: torchfast.nn.AddRMSNorm(4)(torch.ones(2, 5), torch.ones(2, 5)), RuntimeError,
     r"torchfast\.nn\.AddRMSNorm: expected input with trailing dimensions \[4\]"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_gets_a_clear_error(i):
    call, error, match = BAD[i]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ checks need torchfast._C")
def test_ops_called_directly_check_their_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"torchfast\.rms_norm: argument 'weight' has shape \[5\]"):
        torch.ops.torchfast.rms_norm(x, torch.ones(5), 1e-6)
    with pytest.raises(ValueError, match=r"torchfast\.rms_norm: eps must be"):
        torch.ops.torchfast.rms_norm(x, None, -1.0)
    with pytest.raises(TypeError, match=r"torchfast\.add_rms_norm: 'residual' has dtype"):
        torch.ops.torchfast.add_rms_norm(x, x.double(), None, 1e-6)
    with pytest.raises(TypeError, match=r"'weight' has dtype Half but 'x' has dtype BFloat16"):
        torch.ops.torchfast.rms_norm(x.bfloat16(), torch.ones(4, dtype=torch.half), 1e-6)
    rstd = torch.ops.torchfast.rms_norm(x, None, 1e-6)[1]
    with pytest.raises(RuntimeError, match=r"torchfast\.rms_norm_backward: 'grad_out' has shape"):
        torch.ops.torchfast.rms_norm_backward(torch.randn(4, 3), x, None, rstd)
    with pytest.raises(RuntimeError, match=r"torchfast\.rms_norm_backward: argument 'rstd' has shape \[2\]"):
        torch.ops.torchfast.rms_norm_backward(x, x, None, rstd[:2])
    # Same count and rank as the right statistics, another shape: refused, not read in the wrong order.
    x3 = torch.randn(2, 3, 4)
    rstd3 = torch.ops.torchfast.rms_norm(x3, None, 1e-6)[1]
    with pytest.raises(RuntimeError, match=r"'rstd' has shape \[3, 2\]; expected .*\[2, 3\]"):
        torch.ops.torchfast.rms_norm_backward(x3, x3, None, rstd3.reshape(3, 2))
    with pytest.raises(TypeError, match=r"'rstd' has dtype Double; expected Float"):
        torch.ops.torchfast.rms_norm_backward(x, x, None, rstd.double())
