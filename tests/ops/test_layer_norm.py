"""Numerics and operator behaviour of torchfast.layer_norm and torchfast.nn.LayerNorm on every available
device, dtype and layout."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops.layer_norm import layer_norm_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES
from .norm_helpers import DTYPES, LOW, ops_run_during, reference_grads, saved_tensors_of, sum_atol, tensors

SPEC = torchfast.REGISTRY["layer_norm"]
SAMPLE_IDS = ["2d", "no_affine", "3d_nonzero_mean", "one_elem", "strided_weight_only", "empty_batch",
              "fp32_params"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_forward_backward_match_float64_reference(device, dtype, case):
    samples = SPEC.sample_inputs(device, dtype)
    if case >= len(samples):
        pytest.skip("fp32 parameters are the AMP case of bf16/fp16 activations")
    args, kwargs = samples[case]
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    y = torchfast.layer_norm(*leaves, **kwargs)
    g = torch.randn_like(y)
    inputs = tensors(leaves)
    grads = torch.autograd.grad(y, inputs, g) if y.numel() else [torch.zeros_like(t) for t in inputs]
    (ref_y,), ref_grads = reference_grads(layer_norm_reference, leaves, kwargs, [g])
    assert y.dtype == dtype and y.shape == args[0].shape and y.is_contiguous()
    assert_close(y, ref_y, dtype=dtype)
    for name, got, ref, leaf in zip(("x", "weight", "bias"), grads, ref_grads, inputs):
        assert got.dtype == leaf.dtype, name
        assert_close(got, ref, dtype=got.dtype, what=f"grad {name}")


def test_matches_torch_layer_norm_forward_and_backward():
    x = torch.randn(7, 3, 50, requires_grad=True)
    w, b = torch.randn(50, requires_grad=True), torch.randn(50, requires_grad=True)
    g = torch.randn(7, 3, 50)
    ours = torchfast.layer_norm(x, w, b, eps=1e-5)
    ours_grads = torch.autograd.grad(ours, [x, w, b], g)
    theirs = F.layer_norm(x, (50,), w, b, 1e-5)
    theirs_grads = torch.autograd.grad(theirs, [x, w, b], g)
    assert_close(ours, theirs.double(), dtype=torch.float32)
    for name, a, e in zip(("x", "weight", "bias"), ours_grads, theirs_grads):
        assert_close(a, e.double(), dtype=torch.float32, rtol=1e-4, atol=1e-5, what=f"grad {name}")


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_variant_matches_reference(isa, dtype, restore_cpu_isa):
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    pdt = torch.float32 if dtype in LOW else dtype
    x, g = torch.randn(257, 1003, dtype=dtype) + 2, torch.randn(257, 1003, dtype=dtype)
    w, b = torch.rand(1003, dtype=pdt) + 0.5, torch.randn(1003, dtype=pdt)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = torchfast.layer_norm(*leaves, eps=1e-5)
    grads = torch.autograd.grad(y, leaves, g)
    (ref_y,), ref_grads = reference_grads(layer_norm_reference, leaves, {"eps": 1e-5}, [g])
    assert_close(y, ref_y, dtype=dtype)
    assert_close(grads[0], ref_grads[0], dtype=dtype, what="grad x")
    x64 = x.detach().double()
    xhat = (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert_close(grads[1], ref_grads[1], dtype=pdt, atol=sum_atol(g.double() * xhat, pdt), what="grad weight")
    assert_close(grads[2], ref_grads[2], dtype=pdt, atol=sum_atol(g.double(), pdt), what="grad bias")


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_every_cpu_isa_variant_keeps_special_values_in_their_row_at_every_width(isa, dtype, restore_cpu_isa):
    """Widths around the vector steps (the AVX2 bf16/fp16 forward keeps the widened row for its later
    passes, tail included), with a NaN and an inf in some rows: those rows are NaN, the others match the
    float64 reference."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100):
        x = (torch.randn(6, n, generator=gen) * 3 + 1).to(dtype)
        x[1, n // 2] = float("nan")
        x[4, n - 1] = float("inf")
        w, b = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen)
        y = torchfast.layer_norm(x, w, b, eps=1e-5)
        ref = layer_norm_reference(x.double(), w.double(), b.double(), eps=1e-5)
        assert torch.equal(y.isnan(), ref.isnan()), (n, y)
        keep = [0, 2, 3, 5]
        assert_close(y[keep], ref[keep], dtype=dtype, what=f"width {n}")


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("params", ["fp32", "same", "none"])
def test_every_cpu_isa_variant_matches_reference_on_long_rows_of_a_large_input(isa, dtype, params, restore_cpu_isa):
    """Inputs over 4 MiB whose rows (with their widened copy and parameters) overflow L1: the AVX2
    bf16/fp16 forward then takes blocks of 16 rows column tile by column tile (keeps_widened_row in
    layer_norm_kernel.cpp). Rows not a multiple of 16 and widths not a multiple of the tile or the
    vector; a NaN and an inf stay in their rows."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    rows, n = {"fp32": (1031, 2600), "same": (641, 3400), "none": (403, 5600)}[params]
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, n, generator=gen) * 3 + 1).to(dtype)
    assert x.numel() * x.element_size() > 4 << 20
    x[3, n // 2] = float("nan")
    x[rows - 1, n - 1] = float("inf")
    pdt = torch.float32 if params == "fp32" else dtype
    w = b = None
    if params != "none":
        w, b = (torch.rand(n, generator=gen) + 0.5).to(pdt), torch.randn(n, generator=gen).to(pdt)
    y = torchfast.layer_norm(x, w, b, eps=1e-5)
    ref = layer_norm_reference(x.double(), *(None if t is None else t.double() for t in (w, b)), eps=1e-5)
    assert torch.equal(y.isnan(), ref.isnan())
    keep = torch.ones(rows, dtype=torch.bool)
    keep[[3, rows - 1]] = False
    assert_close(y[keep], ref[keep], dtype=dtype, what=f"{rows}x{n}, {params} parameters")


def test_rows_with_a_large_mean_or_an_outlier_are_as_accurate_as_torch():
    """The variance is taken around the mean in a second pass, not as E[x^2] - E[x]^2, which cancels
    catastrophically for such rows; and the mean is summed around the first element. The error against
    float64 is no worse than torch's own kernel's."""
    x = torch.randn(64, 512)
    x[:32] += 1e4  # large mean
    x[32:, 7] = 3e4  # one massive activation per row
    ours = torchfast.layer_norm(x)
    theirs = F.layer_norm(x, (512,))
    exact = F.layer_norm(x.double(), (512,))
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours <= err_theirs, (err_ours, err_theirs)


def test_constant_rows_are_finite_and_special_values_stay_in_their_row():
    x = torch.randn(5, 40)
    x[0] = 3.0  # zero variance: (x - mean) = 0, output = bias
    x[1] = 0.0
    x[2, 5] = float("nan")
    w, b = torch.randn(40), torch.randn(40)
    y = torchfast.layer_norm(x, w, b)
    ref = F.layer_norm(x.double(), (40,), w.double(), b.double())
    assert torch.equal(y[0], b) and torch.equal(y[1], b)
    assert torch.equal(y.isnan(), ref.isnan())
    assert_close(y[[0, 1, 3, 4]], ref[[0, 1, 3, 4]], dtype=torch.float32)


def test_parameter_gradients_are_deterministic_and_in_the_parameters_dtype():
    x = torch.randn(5000, 64, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    _, mean, rstd = torch.ops.torchfast.layer_norm(x, w, b, 1e-5)
    r1 = torch.ops.torchfast.layer_norm_backward(g, x, w, b, mean, rstd)
    r2 = torch.ops.torchfast.layer_norm_backward(g, x, w, b, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2))
    assert r1[0].dtype == torch.bfloat16 and r1[1].dtype == r1[2].dtype == torch.float32
    assert_close(r1[2], g.double().sum(0), dtype=torch.float32, atol=sum_atol(g.double(), torch.float32))
    # without parameters there are no parameter gradients
    assert torch.ops.torchfast.layer_norm_backward(g, x, None, None, mean, rstd)[1:] == (None, None)


def test_backward_saves_x_mean_and_rstd_only():
    x = torch.randn(64, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    saved, y = saved_tensors_of(lambda: torchfast.layer_norm(x, w, b))
    new = [t for t in saved if t is not w and t is not b]  # parameters: no memory of their own
    assert new[0] is x and [tuple(t.shape) for t in new] == [(64, 32), (64,), (64,)]
    assert sum(t.numel() * t.element_size() for t in new) == x.numel() * 4 + 2 * 64 * 4
    y.sum().backward()


def test_backward_runs_the_backward_op_and_compiled_graphs_hold_the_ops():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    x = torch.randn(4, 8, requires_grad=True)
    y = torchfast.layer_norm(x, torch.ones(8), torch.zeros(8))
    assert torch.ops.torchfast.layer_norm_backward.default in ops_run_during(lambda: y.sum().backward())
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torchfast.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    x = torch.randn(5, 16)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    backend = AotEagerAndRecordGraphs()
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager, dtype=torch.float32)
    for got, ref in zip(grads, eager_grads):
        assert_close(got, ref, dtype=torch.float32, what="grad")
    assert "torchfast.layer_norm.default" in backend.fw_graphs[0].code
    assert "torchfast.layer_norm_backward.default" in backend.bw_graphs[0].code


def test_module_matches_torch_nn_layernorm():
    for shape, affine, bias in (((24,), True, True), ((3, 8), True, True), ((24,), True, False),
                                ((24,), False, True)):
        ours = torchfast.nn.LayerNorm(shape, 1e-5, affine, bias)
        theirs = torch.nn.LayerNorm(shape, 1e-5, affine, bias)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for p in theirs.parameters():
            p.data.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 5, 24).reshape(2, 5, *shape)
        assert_close(ours(x), theirs.double()(x.double()), dtype=torch.float32)


def test_amp_bf16_activations_keep_fp32_parameters_under_autocast():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torchfast.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        ops = ops_run_during(lambda: model[1](h))
        y = model[1](h)
        out = model[2](y)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.ops.torchfast.layer_norm.default in ops
    assert not {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype} & set(ops), ops
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == model[1].bias.grad.dtype == torch.float32
    assert_close(y, layer_norm_reference(h.double(), model[1].weight.double(), model[1].bias.double()),
                 dtype=torch.bfloat16)
    # mixed parameter dtypes: refused outside autocast, unified to fp32 inside
    xb, w32, b16 = torch.randn(3, 64, dtype=torch.bfloat16), torch.ones(64), torch.zeros(64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"'weight' has dtype torch\.float32 but 'bias' has dtype torch\.bfloat16"):
        torchfast.layer_norm(xb, w32, b16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torchfast.layer_norm(xb, w32, b16).dtype == torch.bfloat16


BAD = [
    (lambda: torchfast.layer_norm(torch.randn(3, 4), torch.ones(5)), RuntimeError,
     r"torchfast\.layer_norm: argument 'weight' has shape \(5,\) but x's last dimension has size 4"),
    (lambda: torchfast.layer_norm(torch.randn(3, 4), None, torch.ones(3)), RuntimeError,
     r"torchfast\.layer_norm: argument 'bias' has shape \(3,\)"),
    (lambda: torchfast.layer_norm(torch.randn(3, 4), eps=-1.0), ValueError,
     r"torchfast\.layer_norm: eps must be a finite number >= 0"),
    (lambda: torchfast.layer_norm(torch.ones(3, 4, dtype=torch.int32)), TypeError,
     r"torchfast\.layer_norm: argument 'x' has dtype torch\.int32"),
    (lambda: torchfast.layer_norm(torch.ones(3, 4), None, torch.ones(4, dtype=torch.int64)), TypeError,
     r"torchfast\.layer_norm: argument 'bias' has dtype torch\.int64"),
    (lambda: torchfast.layer_norm(torch.ones(2, 0)), RuntimeError,
     r"torchfast\.layer_norm: argument 'x' has shape \(2, 0\): its last dimension is empty"),
    (lambda: torchfast.nn.LayerNorm((3, 4))(torch.ones(2, 3, 5)), RuntimeError,
     r"torchfast\.nn\.LayerNorm: expected input with trailing dimensions \[3, 4\].*got shape \[2, 3, 5\]"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_gets_a_clear_error(i):
    call, error, match = BAD[i]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not torchfast._ext.built(), reason="the C++ checks need torchfast._C")
def test_ops_called_directly_check_their_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"torchfast\.layer_norm: argument 'bias' has shape \[5\]"):
        torch.ops.torchfast.layer_norm(x, None, torch.ones(5), 1e-5)
    with pytest.raises(TypeError, match=r"torchfast\.layer_norm: 'weight' has dtype Float but 'bias' has dtype"):
        torch.ops.torchfast.layer_norm(x.bfloat16(), torch.ones(4), torch.ones(4, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match=r"torchfast\.layer_norm: eps must be"):
        torch.ops.torchfast.layer_norm(x, None, None, float("nan"))
    _, mean, rstd = torch.ops.torchfast.layer_norm(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"torchfast\.layer_norm_backward: argument 'mean' has shape \[3, 1\]"):
        torch.ops.torchfast.layer_norm_backward(x, x, None, None, mean[:, None], rstd)
