"""The Triton swish kernels (torchfast/triton/swish.py): numerics, layouts, operator behaviour, errors.

Without a GPU these run on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel is defined); with one, on CUDA tensors for real. Tracing a Triton op (opcheck's fake
tensor tests, torch.compile) only works on a GPU, so those tests are marked `gpu`.

The interpreter rounds fp32 -> bf16 by truncation where a GPU rounds to nearest, so there bf16 results
can be one bf16 ulp (2^-7 relative) off instead of half of one: still inside the bf16 tolerance.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torchfast
from torchfast.ops.swish import swish_backward_reference, swish_reference
from torchfast.testing import assert_close
from torchfast.triton import swish as tswish

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = torchfast.REGISTRY["swish"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _describe(t):
    shape = "x".join(map(str, t.shape)) or "0d"
    if t.is_contiguous():
        return shape
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return shape + "-channels_last"
    if t.stride() == torch.empty_like(t).stride():
        return shape + "-permuted"
    return shape + "-gaps"


# The registry's sample inputs (the op's one list of shapes that must work): 2-d, empty, 0-d, an odd
# size that is not a multiple of the 1024-element block, a view with gaps, channels-last, transposed.
CASE_IDS = [_describe(args[0]) for args, _ in SPEC.sample_inputs("cpu", torch.float32)]


def _sample(case, dtype):
    return SPEC.sample_inputs(DEVICE, dtype)[case][0][0]


def _reference(x, g):
    x64 = x.detach().double()
    return swish_reference(x64), swish_backward_reference(g.detach().double(), x64)


class _OpLog(TorchDispatchMode):
    """Records the name of every operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_forward_backward_match_reference(case, dtype):
    x = _sample(case, dtype).requires_grad_()
    y = torchfast.swish(x, impl="triton")
    g = torch.randn_like(y)
    y.backward(g)
    ref_y, ref_dx = _reference(x, g)
    assert y.dtype == dtype and x.grad.dtype == dtype
    # Outputs take the layout the fake kernel promises (torch.empty_like(x)): dense inputs keep theirs.
    assert y.stride() == torch.empty_like(x).stride()
    assert x.grad.stride() == torch.empty_like(x).stride()
    assert_close(y, ref_y, dtype=dtype)
    assert_close(x.grad, ref_dx, dtype=dtype, what="grad x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_launchers_match_reference(case, dtype):
    """swish_fwd / swish_bwd called directly, with grad_out contiguous whatever x's layout, so the
    backward also copies a grad_out whose strides differ from x's (channels-last, transposed x)."""
    x = _sample(case, dtype)
    g = torch.randn(x.shape, device=DEVICE, dtype=dtype)
    y = tswish.swish_fwd(x)
    dx = tswish.swish_bwd(g, x)
    ref_y, ref_dx = _reference(x, g)
    assert y.stride() == dx.stride() == torch.empty_like(x).stride()
    assert_close(y, ref_y, dtype=dtype)
    assert_close(dx, ref_dx, dtype=dtype, what="grad x")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_block_tensor_matches_reference(dtype):
    """5 blocks and a partial one, with values wide enough to reach both tails of the sigmoid."""
    x = torch.randn(5 * 1024 + 77, device=DEVICE, dtype=dtype) * 12
    g = torch.randn_like(x)
    ref_y, ref_dx = _reference(x, g)
    assert_close(tswish.swish_fwd(x), ref_y, dtype=dtype)
    assert_close(tswish.swish_bwd(g, x), ref_dx, dtype=dtype, what="grad x")


def test_dense_inputs_are_used_without_a_copy_others_are_copied_once():
    base = torch.randn(2, 3, 5, 4, device=DEVICE)
    for x in (base, base.to(memory_format=torch.channels_last), base[0, 0].t()):
        assert tswish._laid_out_like(x, torch.empty_like(x)) is x
    gaps = base[:, ::2]
    out = torch.empty_like(gaps)
    assert tswish._laid_out_like(gaps, out) is not gaps
    stride0 = torch.ones((), device=DEVICE).expand(2, 3, 5, 4)
    for t, o in ((gaps, out), (stride0, torch.empty_like(base))):
        copied = tswish._laid_out_like(t, o)
        assert copied.stride() == o.stride() and torch.equal(copied, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stride0_grad_out_from_sum_backward(dtype):
    x = (torch.randn(3, 343, device=DEVICE, dtype=dtype) * 4).requires_grad_()
    torchfast.swish(x, impl="triton").sum().backward()  # grad_out is a stride-0 expanded scalar
    ones = torch.ones((), device=DEVICE, dtype=dtype).expand(x.shape)
    ref = swish_backward_reference(ones.double(), x.detach().double())
    assert_close(x.grad, ref, dtype=dtype, what="grad x")
    assert_close(tswish.swish_bwd(ones, x.detach()), ref, dtype=dtype, what="swish_bwd, stride-0 grad_out")


# numpy, running the kernels under the interpreter, warns when it computes -inf * 0 = NaN, which is
# exactly the intended result for swish(-inf).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_follow_torch_silu(dtype):
    """NaN and +-Inf as F.silu and its backward give them (swish(-inf) = NaN, swish(+inf) = +inf,
    grad NaN at both infinities), and the tails where exp(-x) would overflow."""
    vals = [float("-inf"), float("inf"), float("nan"), -0.0, 0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0,
            -89.0, -100.0, -104.0, -200.0, -1e30, 1e30, 3.0e38, -3.0e38, -7e4, 6e4]
    x = torch.tensor(vals, device=DEVICE, dtype=torch.float64).to(dtype).requires_grad_()
    y = torchfast.swish(x, impl="triton")
    y.backward(torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    y64 = F.silu(x64)
    y64.backward(torch.ones_like(y64))
    assert torch.equal(y.isnan(), y64.isnan()) and torch.equal(x.grad.isnan(), x64.grad.isnan())
    assert_close(y, y64, dtype=dtype)
    assert_close(x.grad, x64.grad, dtype=dtype, what="grad x")


def test_use_impl_context_runs_the_triton_ops_forward_and_backward():
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    with torchfast.use_impl("triton"), _OpLog() as log:
        y = torchfast.swish(x)
        y.backward(torch.ones_like(y))
        torchfast.nn.Swish()(x)
    assert log.names.count("torchfast::swish_triton") == 2
    assert "torchfast::swish_backward_triton" in log.names
    assert not {"torchfast::swish", "torchfast::swish_backward"} & set(log.names)
    assert_close(x.grad, swish_backward_reference(torch.ones(4, 9).double(), x.detach().double().cpu()))
    # impl= in a call beats the context
    with torchfast.use_impl("triton"), _OpLog() as log:
        torchfast.swish(x, impl="reference")
    assert "torchfast::swish_triton" not in log.names


def test_backward_saves_only_x():
    saved = []
    x = torch.randn(8, 33, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torchfast.swish(x, impl="triton")
    assert len(saved) == 1 and saved[0] is x


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(3, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tswish.swish, (x,))
    assert torch.autograd.gradgradcheck(tswish.swish, (x,))


def test_autocast_keeps_the_input_dtype():
    x = torch.randn(5, 7, device=DEVICE)
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = torchfast.swish(x, impl="triton")
    assert y.dtype == torch.float32
    assert_close(y, swish_reference(x.double()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_schema_and_autograd_registration(dtype):
    """The parts of opcheck that run eagerly, so they work under the interpreter too (the fake-tensor
    and compile parts need a GPU: test_opcheck_gpu)."""
    x = torch.randn(3, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, device=DEVICE, dtype=dtype, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.torchfast.swish_triton.default, (x,), test_utils=utils)
    torch.library.opcheck(torch.ops.torchfast.swish_backward_triton.default, (g, x), test_utils=utils)


# --- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_unsupported_dtype_is_a_type_error_naming_op_and_argument(dtype):
    x = torch.ones(3, device=DEVICE, dtype=dtype)
    allowed = "supported dtypes are float32, float64, bfloat16 and float16"
    with pytest.raises(TypeError, match=rf"torchfast.swish: argument 'x' has dtype {dtype}; {allowed}"):
        torchfast.swish(x, impl="triton")
    with torchfast.use_impl("triton"), pytest.raises(TypeError, match=rf"argument 'x' has dtype {dtype}"):
        torchfast.swish(x)
    with pytest.raises(TypeError, match=rf"torchfast.swish: argument 'x' has dtype {dtype}; {allowed}"):
        tswish.swish_fwd(x)
    with pytest.raises(TypeError, match=rf"torchfast.swish_backward: argument 'grad_out' has dtype {dtype}"):
        tswish.swish_bwd(x, x)


def test_backward_rejects_mismatched_arguments():
    x = torch.randn(3, 4, device=DEVICE)
    shape_msg = r"torchfast.swish_backward: 'grad_out' has shape \(4, 3\) but 'x' has shape \(3, 4\)"
    with pytest.raises(RuntimeError, match=shape_msg):
        tswish.swish_bwd(torch.randn(4, 3, device=DEVICE), x)
    with pytest.raises(RuntimeError, match=shape_msg):
        torch.ops.torchfast.swish_backward_triton(torch.randn(4, 3, device=DEVICE), x)
    dtype_msg = r"'grad_out' has dtype torch.float64 but 'x' has dtype torch.float32; they must match"
    with pytest.raises(TypeError, match=dtype_msg):
        tswish.swish_bwd(x.double(), x)
    with pytest.raises(TypeError, match=r"argument 'x' must be a Tensor, got list"):
        tswish.swish_fwd([1.0, 2.0])


def test_devices_the_kernels_cannot_run_on_are_refused(monkeypatch):
    meta = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match=r"triton: device 'meta' not supported"):
        torchfast.swish(meta, impl="triton")
    with pytest.raises(RuntimeError, match=r"torchfast.swish \(triton\): argument 'x' is on meta"):
        tswish.swish_fwd(meta)
    # CPU tensors need the interpreter: without it the registry and the launchers both say so.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"triton: Triton kernels run on CUDA tensors.*TRITON_INTERPRET=1"):
        torchfast.swish(cpu, impl="triton")
    with pytest.raises(RuntimeError, match=r"argument 'grad_out' is on cpu: .*TRITON_INTERPRET=1"):
        tswish.swish_bwd(cpu, cpu)


# --- GPU only: tracing the Triton ops, and tensors over 2^31 elements ---------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_gpu(dtype):
    for args, _ in SPEC.sample_inputs("cuda", dtype):
        x = args[0].clone().requires_grad_()
        g = torch.randn(x.shape, device="cuda", dtype=dtype).requires_grad_()
        torch.library.opcheck(torch.ops.torchfast.swish_triton.default, (x,))
        torch.library.opcheck(torch.ops.torchfast.swish_backward_triton.default, (g, x))


@pytest.mark.gpu
def test_compile_fullgraph_forward_backward_matches_eager():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torchfast.nn.Swish(), torch.nn.Linear(64, 8)).cuda()
    x = torch.randn(37, 16, device="cuda")
    params = list(model.parameters())
    with torchfast.use_impl("triton"):
        eager_out = model(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), params)
        recorder = AotEagerAndRecordGraphs()
        for backend in (recorder, "inductor"):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            out = compiled(x)
            grads = torch.autograd.grad(out.square().sum(), params)
            assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
            for got, want in zip(grads, eager_grads):
                assert_close(got, want, rtol=1e-4, atol=1e-5, what="grad")
    # Dynamo sees the operator; AOT autograd decomposes each triton_op into its kernel launch, so the
    # graphs hold Triton kernels, and neither the native op nor a decomposed reference.
    dynamo_code = recorder.graphs[0].code
    assert "torchfast.swish_triton" in dynamo_code
    for code in (recorder.fw_graphs[0].code, recorder.bw_graphs[0].code):
        assert "triton_kernel_wrapper" in code or "swish_triton" in code or "swish_backward_triton" in code
        assert "sigmoid" not in code and "torchfast.swish.default" not in code


@pytest.mark.gpu
def test_tensor_over_2_31_elements_uses_64bit_offsets():
    n = 2**31 + 3 * 1024 + 5
    if torch.cuda.mem_get_info()[0] < 5 * n * 2:
        pytest.skip("needs about 22 GB of free GPU memory")
    x = torch.empty(n, device="cuda", dtype=torch.float16).uniform_(-8, 8)
    y = tswish.swish_fwd(x)
    dx = tswish.swish_bwd(torch.ones((), device="cuda", dtype=torch.float16).expand(n), x)
    # The element before 2^31 and everything past it: int32 offsets would wrap there.
    for lo, hi in ((0, 4096), (2**31 - 4096, 2**31 + 4096), (n - 4096, n)):
        xs = x[lo:hi].double()
        assert_close(y[lo:hi], swish_reference(xs), dtype=torch.float16, what=f"y[{lo}:{hi}]")
        assert_close(dx[lo:hi], swish_backward_reference(torch.ones_like(xs), xs), dtype=torch.float16,
                     what=f"grad x[{lo}:{hi}]")
