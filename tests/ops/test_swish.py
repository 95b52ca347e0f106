"""Numerics and operator behaviour of torchfast.swish on every available device, dtype and layout."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast._registry import Impl, OpSpec, select
from torchfast.ops.swish import swish_backward_reference, swish_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES

SPEC = torchfast.REGISTRY["swish"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SAMPLE_IDS = ["2d", "empty", "0d", "odd", "gaps", "channels_last", "transposed"]


def _samples(device, dtype):
    return [args[0] for args, _ in SPEC.sample_inputs(device, dtype)]


def _ref_fwd_bwd(x, g):
    x64 = x.detach().double()
    return swish_reference(x64), swish_backward_reference(g.double(), x64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_forward_backward_match_reference(device, dtype, case):
    x = _samples(device, dtype)[case].requires_grad_()
    y = torchfast.swish(x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g) if x.numel() else (torch.zeros_like(x),)
    ref_y, ref_dx = _ref_fwd_bwd(x, g)
    assert y.dtype == dtype and y.shape == x.shape
    # The output takes x's layout when x is dense (channels-last stays channels-last), exactly the
    # strides the fake kernel (torch.empty_like) promises.
    assert y.stride() == torch.empty_like(x).stride()
    assert_close(y, ref_y, dtype=dtype)
    assert_close(dx, ref_dx, dtype=dtype, what="grad x")


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_variant_matches_reference(isa, dtype, restore_cpu_isa):
    """Each compiled ISA variant is checked, not only the one this CPU picks; 100003 elements cross the
    parallel grain and leave a vector tail on every thread's chunk."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    assert torchfast._ext.active_cpu_isa() == isa
    x = torch.randn(100003, dtype=dtype) * 6
    g = torch.randn_like(x)
    ref_y, ref_dx = _ref_fwd_bwd(x, g)
    assert_close(torch.ops.torchfast.swish(x), ref_y, dtype=dtype)
    assert_close(torch.ops.torchfast.swish_backward(g, x), ref_dx, dtype=dtype, what="grad x")


def test_unknown_or_uncompiled_isa_is_refused():
    if not torchfast._ext.built():
        pytest.skip("torchfast._C is not built")
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        torchfast._ext.set_cpu_isa("SSE9")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_special_values_follow_torch_silu(device, dtype):
    """NaN and +-Inf come out exactly as torch's own silu gives them (swish(-inf) = -inf*0 = NaN),
    including the range where exp(-x) overflows and the kernel's fast exp saturates."""
    vals = [float("-inf"), float("inf"), float("nan"), -0.0, 0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0,
            -88.0, -88.8, -89.0, -100.0, -104.0, -200.0, -1e30, 1e30, 3.0e38, -3.0e38]
    x = torch.tensor(vals, device=device, dtype=dtype)
    y = torchfast.swish(x)
    expected = F.silu(x.double())
    assert torch.equal(y.isnan(), expected.isnan()), (y, expected)
    assert torch.equal(y.isinf(), expected.isinf()), (y, expected)
    assert_close(y, expected, dtype=dtype)
    g = torch.ones_like(x)
    dx = torch.ops.torchfast.swish_backward(g, x)
    ref_dx = torch.ops.aten.silu_backward(g.double(), x.double())
    assert torch.equal(dx.isnan(), ref_dx.isnan()), (dx, ref_dx)
    assert_close(dx, ref_dx, dtype=dtype, what="grad x")


def test_many_threads_large_tensor_matches():
    x = torch.randn(1 << 20) * 8
    assert_close(torchfast.swish(x), swish_reference(x.double()), dtype=torch.float32)


def test_backward_saves_only_x():
    x = torch.randn(64, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torchfast.swish(x)
    assert len(saved) == 1 and saved[0] is x
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * x.element_size()
    y.sum().backward()


def test_backward_runs_the_backward_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(8, requires_grad=True)
    y = torchfast.swish(x)
    with Record() as rec:
        y.backward(torch.ones_like(y))
    assert torch.ops.torchfast.swish_backward.default in rec.ops


def test_compile_fullgraph_forward_backward_and_backward_graph_has_the_op():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torchfast.nn.Swish(), torch.nn.Linear(32, 4))
    x = torch.randn(5, 16)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_close(out, eager_out, dtype=torch.float32)
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, dtype=torch.float32, what="grad")
    assert "torchfast.swish.default" in backend.fw_graphs[0].code
    assert "torchfast.swish_backward.default" in backend.bw_graphs[0].code
    # and with inductor, the backend users get by default
    inductor = torch.compile(model, fullgraph=True)
    assert_close(inductor(x), eager_out, dtype=torch.float32)


def test_module_matches_nn_silu():
    assert torchfast.nn.SiLU is torchfast.nn.Swish
    ours, theirs = torchfast.nn.Swish(), torch.nn.SiLU()
    assert repr(ours) == "Swish()" and str(theirs) == "SiLU()"
    assert repr(torchfast.nn.Swish(inplace=True)) == "Swish(inplace=True)"
    assert ours.state_dict() == theirs.state_dict() == {}
    x = torch.randn(3, 9)
    assert_close(ours(x), theirs(x.double()), dtype=torch.float32)


def test_impl_selection_per_call_and_per_context():
    x = torch.randn(10)
    ref = torchfast.swish(x, impl="reference")
    assert_close(torchfast.swish(x, impl="native"), ref.double(), dtype=torch.float32)
    with torchfast.use_impl("reference"):
        assert select(SPEC, (x,), None).name == "reference"
        assert select(SPEC, (x,), "native").name == "native"  # the argument wins over the context
        with torchfast.use_impl("native"):
            assert select(SPEC, (x,), None).name == "native"
        assert select(SPEC, (x,), None).name == "reference"
    assert select(SPEC, (x,), None).name == "native"
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        torchfast.swish(x, impl="fast")


def test_no_fitting_impl_lists_every_reason():
    spec = OpSpec(name="demo", schemas={}, reference=swish_reference, arg_names=("x",), sample_inputs=None,
                  impls=[Impl("native", swish_reference, ("cuda",)),
                         Impl("triton", swish_reference, ("cpu",), unavailable=lambda d, e: "Triton missing")])
    with pytest.raises(RuntimeError) as err:
        select(spec, (torch.ones(2),), None)
    msg = str(err.value)
    assert "torchfast.demo" in msg and "device 'cpu' not supported (supports: cuda)" in msg
    assert "triton: Triton missing" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_bad_dtype_is_a_type_error_naming_op_and_argument(dtype):
    x = torch.ones(3).to(dtype)
    with pytest.raises(TypeError, match=r"torchfast\.swish: argument 'x' has dtype"):
        torchfast.swish(x)
    with pytest.raises(TypeError, match=r"torchfast\.swish: argument 'x' has dtype"):
        torchfast.nn.Swish()(x)
    if torchfast._ext.built():  # the op itself checks too, for callers of torch.ops.torchfast.swish
        with pytest.raises(TypeError, match=r"torchfast\.swish: argument 'x'"):
            torch.ops.torchfast.swish(x)


def test_backward_op_rejects_mismatched_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"torchfast\.swish_backward: 'grad_out' has shape"):
        torch.ops.torchfast.swish_backward(torch.randn(4, 3), x)
    with pytest.raises(TypeError, match=r"'grad_out' has dtype .* but 'x' has dtype"):
        torch.ops.torchfast.swish_backward(torch.randn(3, 4, dtype=torch.float64), x)


def test_sparse_and_non_tensor_inputs_get_clear_errors():
    with pytest.raises(RuntimeError, match=r"torchfast\.swish: argument 'x' has layout torch.sparse_coo"):
        torchfast.swish(torch.eye(3).to_sparse())
    with pytest.raises(TypeError, match=r"torchfast\.swish: argument 'x' must be a Tensor"):
        torchfast.swish([1.0, 2.0])
