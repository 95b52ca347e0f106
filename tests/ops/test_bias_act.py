"""Numerics and operator behaviour of torchfast.bias_act, and the modules built on it (Linear, GELU)."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops._activations import ACTS
from torchfast.ops.bias_act import bias_act_backward_reference, bias_act_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES

SPEC = torchfast.REGISTRY["bias_act"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SAMPLE_IDS = [
    "gelu-2d",
    "swish-3d",
    "gelu_tanh-1d-odd",
    "relu-empty",
    "identity-rowview",
    "relu-transposed",
    "gelu-nobias-gaps",
    "swish-nobias-channels_last",
    "gelu_tanh-nobias-0d",
]
TORCH_ACTS = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "swish": F.silu,
}


def _reference(x, bias, g, act):
    """float64 forward and (dx, dbias) of the same inputs."""
    x64 = x.detach().double()
    b64 = None if bias is None else bias.detach().double()
    dx, db = bias_act_backward_reference(g.double(), x64, b64, act=act)
    return bias_act_reference(x64, b64, act=act), dx, db


def _run(x, bias, act, g=None):
    x = x.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = torchfast.bias_act(x, bias, act=act)
    g = torch.randn_like(y) if g is None else g
    leaves = [x] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, leaves, g) if y.numel() else [torch.zeros_like(t) for t in leaves]
    return y, g, grads[0], (grads[1] if bias is not None else None)


def _check(x, bias, act, dtype, g=None, rtol_db=None):
    y, g, dx, db = _run(x, bias, act, g)
    ref_y, ref_dx, ref_db = _reference(x, bias, g, act)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_y, dtype=dtype)
    assert_close(dx, ref_dx, dtype=dtype, what="grad x")
    if bias is not None:
        assert db.dtype == bias.dtype
        # The bias gradient is a sum over rows, rounded once to the bias dtype: its error is one rounding
        # relative to the largest sum, plus fp32 accumulation (~rows * 2^-24 relative).
        r, a = torchfast.testing.tolerance(dtype)
        scale = ref_db.abs().max().item() if ref_db.numel() else 0.0
        assert_close(db, ref_db, dtype=dtype, rtol=rtol_db or r, atol=a + r * scale, what="grad bias")
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_forward_backward_match_reference(device, dtype, case):
    (x, bias), kw = SPEC.sample_inputs(device, dtype)[case]
    y = _check(x, bias, kw["act"], dtype)
    # Layout: x's dense layout without a bias (the swish rule), contiguous with one, as the fake says.
    expected = torch.empty_like(x) if bias is None else x.new_empty(x.shape)
    assert y.stride() == expected.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_every_activation_matches_reference(device, dtype, act):
    x = torch.randn(7, 301, device=device, dtype=dtype) * 4
    bias = torch.randn(301, device=device, dtype=dtype)
    _check(x, bias, act, dtype)
    _check(x, None, act, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_and_gradgradcheck_every_activation(act):
    x = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: torchfast.bias_act(x, b, act=act)
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))
    fn1 = lambda x: torchfast.bias_act(x, None, act=act)
    assert torch.autograd.gradgradcheck(fn1, (x,))


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_variant_matches_reference(isa, dtype, restore_cpu_isa):
    """Each compiled ISA variant, every activation; 37 x 1503 elements cross the parallel grain, split
    the bias reduction into row chunks, and leave a vector tail in every row."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    assert torchfast._ext.active_cpu_isa() == isa
    x = torch.randn(37, 1503, dtype=dtype) * 4
    bias = torch.randn(1503, dtype=dtype)
    for act in ACTS:
        _check(x, bias, act, dtype)
    _check(x, None, "gelu", dtype)


@pytest.mark.parametrize("shape", [(4096, 33), (1, 100003), (3, 40000), (2, 2, 5, 7000)], ids=str)
def test_bias_gradient_reduction_shapes_threads_and_determinism(shape):
    """Many short rows, one very long row (column blocks), fewer rows than threads; fp32 accumulation
    keeps a bf16 bias gradient within one bf16 rounding of the exact sum, and the result is the same on
    every run and with one or all threads."""
    x = torch.randn(*shape, dtype=torch.bfloat16)
    bias = torch.randn(shape[-1], dtype=torch.bfloat16)
    g = torch.randn(*shape, dtype=torch.bfloat16)
    _check(x, bias, "gelu", torch.bfloat16, g=g)
    dx1, db1 = torch.ops.torchfast.bias_act_backward(g, x, bias, act="gelu")
    dx2, db2 = torch.ops.torchfast.bias_act_backward(g, x, bias, act="gelu")
    assert torch.equal(db1, db2) and torch.equal(dx1, dx2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dx3, db3 = torch.ops.torchfast.bias_act_backward(g, x, bias, act="gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dx1, dx3)
    assert_close(db3, db1.double(), dtype=torch.bfloat16)  # partial sums differ in order only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_special_values_follow_torch_float64(dtype, act):
    """NaN and +-Inf give what torch's own activations give in float64 (the mathematically right values;
    see activations.h for the two places torch's float32 kernels differ), forward and backward, including
    the range where the kernels' fast exponential saturates."""
    vals = [
        float("-inf"),
        float("inf"),
        float("nan"),
        -0.0,
        0.0,
        1e-30,
        -1e-30,
        5.0,
        -5.0,
        10.0,
        -10.0,
        20.0,
        -20.0,
        88.0,
        -88.0,
        -89.0,
        -104.0,
        -200.0,
        1e10,
        -1e10,
        1e30,
        -1e30,
        3.0e38,
        -3.0e38,
    ]
    x = torch.tensor(vals, dtype=dtype)
    x64 = x.double().requires_grad_()
    expected = TORCH_ACTS[act](x64)
    (expected_dx,) = torch.autograd.grad(expected, x64, torch.ones_like(expected))
    y = torchfast.bias_act(x, None, act=act)
    dx, _ = torch.ops.torchfast.bias_act_backward(torch.ones_like(x), x, None, act=act)
    for got, exp, what in ((y, expected, "output"), (dx, expected_dx, "grad x")):
        assert torch.equal(got.isnan(), exp.isnan()), (what, got, exp)
        assert_close(got, exp, dtype=dtype, what=what)
    # with a bias, the same values through the row kernel (the bias shifts nothing: it is zero)
    yb = torchfast.bias_act(x[None], torch.zeros(x.shape[0], dtype=dtype), act=act)[0]
    assert torch.equal(yb.isnan(), y.isnan()) and torch.equal(yb[~y.isnan()], y[~y.isnan()])


def test_backward_saves_only_x_and_the_bias():
    """Saved: x and the bias parameter; the pre-activation x + bias is never materialized."""
    x = torch.randn(64, 32, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torchfast.bias_act(x, bias, act="gelu")
    assert len(saved) == 2 and saved[0] is x and saved[1] is bias
    y.sum().backward()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torchfast.nn.GELU()(x)
    assert [t is x for t in saved] == [True]


def test_no_bias_gradient_when_bias_is_none():
    x = torch.randn(4, 5, requires_grad=True)
    y = torchfast.bias_act(x, None, act="swish")
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert_close(
        dx, torch.ops.aten.silu_backward(torch.ones_like(x).double(), x.double()), dtype=torch.float32
    )


def test_compile_fullgraph_linear_epilogue_and_backward_graph_has_the_ops():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    model = torch.nn.Sequential(torchfast.nn.Linear(16, 32, activation="gelu"), torch.nn.Linear(32, 4))
    x = torch.randn(5, 16)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    backend = AotEagerAndRecordGraphs()
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager_out, dtype=torch.float32)
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, dtype=torch.float32, what="grad")
    assert "torchfast.bias_act.default" in backend.fw_graphs[0].code
    assert "torchfast.bias_act_backward.default" in backend.bw_graphs[0].code


def test_autocast_bias_follows_x_and_its_gradient_keeps_fp32():
    """Under bf16 autocast a bf16 x with an fp32 bias: the bias is cast to bf16 (as autocast does for
    F.linear), the output is bf16, and the gradient reaching the fp32 bias is fp32."""
    x = torch.randn(8, 24, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torchfast.bias_act(x, bias, act="gelu")
    assert y.dtype == torch.bfloat16
    assert_close(y, F.gelu(x.double() + bias.bfloat16().double()), dtype=torch.bfloat16)
    y.float().sum().backward()
    assert bias.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    with pytest.raises(
        TypeError, match=r"torchfast\.bias_act: 'bias' has dtype Float but 'x' has dtype BFloat16"
    ):
        torchfast.bias_act(x.detach(), bias.detach(), act="gelu")  # outside autocast: an error


def test_linear_autocast_matches_nn_linear_autocast():
    lin = torch.nn.Linear(16, 24)
    ours = torchfast.nn.Linear(16, 24, activation="swish")
    ours.load_state_dict(lin.state_dict())
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.silu(lin(x))
        got = ours(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got, expected.double(), dtype=torch.bfloat16, atol=2e-2)


@pytest.mark.parametrize("act", [None] + list(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_nn_linear_plus_activation(act, bias):
    torch_act = TORCH_ACTS[act or "identity"]
    lin = torch.nn.Linear(12, 20, bias=bias, dtype=torch.float64)
    ours = torchfast.nn.Linear(12, 20, bias=bias, dtype=torch.float64, activation=act)
    ours.load_state_dict(lin.state_dict())  # a plain nn.Linear checkpoint loads
    assert ours.state_dict().keys() == lin.state_dict().keys()
    assert isinstance(ours, torch.nn.Linear)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    y, ref = ours(x), torch_act(lin(x))
    assert_close(y, ref, dtype=torch.float64)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(ours.parameters()), g)
    ref_grads = torch.autograd.grad(ref, list(lin.parameters()), g)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, dtype=torch.float64, what="grad")


def test_linear_repr_from_linear_and_bad_activation():
    assert (
        repr(torchfast.nn.Linear(3, 4, activation="gelu"))
        == "Linear(in_features=3, out_features=4, bias=True, activation='gelu')"
    )
    assert repr(torchfast.nn.Linear(3, 4, bias=False)) == repr(torch.nn.Linear(3, 4, bias=False))
    lin = torch.nn.Linear(3, 4)
    fused = torchfast.nn.Linear.from_linear(lin, activation="relu")
    assert fused.weight is lin.weight and fused.bias is lin.bias
    x = torch.randn(2, 3)
    assert_close(fused(x), F.relu(lin(x)).double(), dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"torchfast\.nn\.Linear: unknown activation 'tanh' for argument 'activation'"
    ):
        torchfast.nn.Linear(3, 4, activation="tanh")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_module_matches_nn_gelu(approximate):
    ours, theirs = torchfast.nn.GELU(approximate), torch.nn.GELU(approximate)
    assert repr(ours) == repr(theirs) == f"GELU(approximate='{approximate}')"
    assert ours.state_dict() == {}
    x = torch.randn(3, 9, 5)
    assert_close(ours(x), theirs(x.double()), dtype=torch.float32)
    xc = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert ours(xc).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(
        ValueError, match=r"torchfast\.nn\.GELU: argument 'approximate' must be 'none' or 'tanh'"
    ):
        torchfast.nn.GELU("fast")


def test_impl_selection_reference_and_native_agree():
    x, b = torch.randn(5, 7), torch.randn(7)
    ref = torchfast.bias_act(x, b, act="gelu_tanh", impl="reference")
    assert_close(torchfast.bias_act(x, b, act="gelu_tanh", impl="native"), ref.double(), dtype=torch.float32)
    with torchfast.use_impl("reference"):
        assert torch.equal(torchfast.bias_act(x, b, act="gelu_tanh"), ref)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_bad_dtype_is_a_type_error_naming_op_and_argument(dtype):
    x = torch.ones(3, 4).to(dtype)
    with pytest.raises(TypeError, match=r"torchfast\.bias_act: argument 'x' has dtype"):
        torchfast.bias_act(x, None, act="relu")
    with pytest.raises(TypeError, match=r"torchfast\.bias_act: argument 'bias' has dtype"):
        torchfast.bias_act(torch.ones(3, 4), torch.ones(4).to(dtype), act="relu")
    if torchfast._ext.built():  # the op itself checks too, for callers of torch.ops.torchfast.bias_act
        with pytest.raises(TypeError, match=r"torchfast\.bias_act: argument 'x'"):
            torch.ops.torchfast.bias_act(x, None, act="relu")
        with pytest.raises(TypeError, match=r"torchfast\.bias_act: argument 'bias'"):
            torch.ops.torchfast.bias_act(torch.ones(3, 4), torch.ones(4).to(dtype), act="relu")


def test_bad_bias_shape_and_activation_name_errors_name_op_and_argument():
    x = torch.randn(3, 7)
    calls = [lambda b, a: torchfast.bias_act(x, b, act=a)]
    if torchfast._ext.built():
        calls.append(lambda b, a: torch.ops.torchfast.bias_act(x, b, act=a))
    for call in calls:
        with pytest.raises(
            RuntimeError,
            match=r"torchfast\.bias_act: argument 'bias' has shape \[5\] but x's last "
            r"dimension is 7",
        ):
            call(torch.randn(5), "relu")
        with pytest.raises(RuntimeError, match=r"argument 'bias' has shape \[1, 7\]"):
            call(torch.randn(1, 7), "relu")
        with pytest.raises(
            ValueError,
            match=r"torchfast\.bias_act: unknown activation 'tanh' for argument 'act'; "
            r"expected one of identity, relu, gelu, gelu_tanh, swish",
        ):
            call(torch.randn(7), "tanh")
    with pytest.raises(RuntimeError, match=r"torchfast\.bias_act: 'x' is 0-dimensional"):
        torchfast.bias_act(torch.tensor(1.0), torch.randn(1), act="relu")
    with pytest.raises(RuntimeError, match=r"torchfast\.bias_act: argument 'x' has layout torch.sparse_coo"):
        torchfast.bias_act(torch.eye(3).to_sparse(), None, act="relu")


def test_backward_op_rejects_mismatched_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"torchfast\.bias_act_backward: 'grad_out' has shape"):
        torch.ops.torchfast.bias_act_backward(torch.randn(4, 3), x, None, act="gelu")
    with pytest.raises(RuntimeError, match=r"torchfast\.bias_act_backward: argument 'bias' has shape"):
        torch.ops.torchfast.bias_act_backward(torch.randn(3, 4), x, torch.randn(3), act="gelu")


FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["torchfast._C"] = None  # makes `from torchfast import _C` raise ImportError
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F, torchfast
from torch.library import opcheck
assert not torchfast.build_info()["compiled"]
x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
b = torch.randn(6, dtype=torch.float64, requires_grad=True)
for act in ("relu", "gelu", "gelu_tanh", "swish", "identity"):
    assert torch.autograd.gradcheck(lambda x, b: torchfast.bias_act(x, b, act=act), (x, b))
y = torchfast.bias_act(x.bfloat16(), b.bfloat16(), act="gelu")
assert y.dtype == torch.bfloat16 and y.is_contiguous()
assert torch.allclose(torchfast.swiglu(x), F.silu(x[:, :3]) * x[:, 3:])
assert torch.allclose(torchfast.geglu(x[:, :3], x[:, 3:], approximate="tanh"),
                      F.gelu(x[:, :3], approximate="tanh") * x[:, 3:])
assert torch.autograd.gradcheck(lambda x: torchfast.geglu(x), (x,))
for op, args, kw in [("bias_act", (torch.randn(3, 4), torch.randn(4)), {"act": "gelu"}),
                     ("bias_act", (torch.randn(3, 4), None), {"act": "relu"}),
                     ("swiglu", (torch.randn(3, 4), torch.randn(3, 4)), {}),
                     ("swiglu_packed", (torch.randn(3, 4),), {}),
                     ("geglu", (torch.randn(3, 4), torch.randn(3, 4)), {"approximate": "tanh"}),
                     ("geglu_packed", (torch.randn(3, 4),), {"approximate": "none"})]:
    args = tuple(a.requires_grad_() if a is not None else a for a in args)
    opcheck(getattr(torch.ops.torchfast, op).default, args, kw)
m = torchfast.nn.SwiGLU(6, 8)
m(torch.randn(2, 6)).sum().backward()
torchfast.nn.Linear(6, 3, activation="gelu")(torch.randn(2, 6)).sum().backward()
print("FALLBACK-OK")
"""


def test_ops_and_modules_work_without_compiled_extension():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and "FALLBACK-OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype, fwd_eps, bwd_eps", [(torch.bfloat16, 0.55, 0.55), (torch.float16, 0.6, 3.0)],
                         ids=["bfloat16", "float16"])
def test_gelu_reduced_precision_accuracy_on_a_dense_grid(isa, dtype, fwd_eps, bwd_eps, restore_cpu_isa):
    """gelu and its derivative in bf16/fp16 against float64, in units of the dtype's epsilon, where
    |value| > 1e-3: the fwd is correctly rounded up to the float32 math's own error (about half an
    epsilon); the derivative cancels near its zero at x = -0.75, so fp16 is allowed a few epsilons
    there. (The bf16 kernels use a 14-bit reciprocal; fp16 keeps the exact division because of that
    cancellation: with the approximate one this bound failed at 8.7 epsilons.)"""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    x = torch.linspace(-12, 12, 400_001).to(dtype)
    ref = F.gelu(x.double())
    dref = torch.func.grad(lambda t: F.gelu(t).sum())(x.double())
    y = torch.ops.torchfast.bias_act(x, None, act="gelu").double()
    dy = torch.ops.torchfast.bias_act_backward(torch.ones_like(x), x, None, act="gelu")[0].double()
    eps = torch.finfo(dtype).eps
    big, dbig = ref.abs() > 1e-3, dref.abs() > 1e-3
    fwd = ((y - ref).abs() / ref.abs())[big].max().item() / eps
    bwd = ((dy - dref).abs() / dref.abs())[dbig].max().item() / eps
    assert fwd <= fwd_eps and bwd <= bwd_eps, (fwd, bwd)
