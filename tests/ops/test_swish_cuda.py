"""What is specific to swish's CUDA kernels (csrc/ops/swish/swish_cuda.cu, torchfast/cuda_utils.cuh).

The 16-byte vector path and its scalar fallbacks (tails, misaligned pointers), the grid-stride loop and
its 64-bit indices (a tensor over 2^31 elements), the stream and device the kernels run on, and special
values. The generic per-device tests (layouts, autograd, opcheck) are in test_swish.py and run on CUDA
too when a GPU is visible. These call torch.ops.torchfast.* directly, so they test the CUDA kernel and
nothing else.
"""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops.swish import swish_backward_reference, swish_reference
from torchfast.testing import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OPS = torch.ops.torchfast


def _vec_elems(dtype):
    """Elements per 16-byte vector access in the kernel (cuda_utils.cuh, kVecElems)."""
    return 16 // torch.empty((), dtype=dtype).element_size()


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    for op in ("torchfast::swish", "torchfast::swish_backward"):
        if not torchfast._ext.has_native_kernel(op, "cuda"):
            why = torchfast._ext.LOAD_ERROR or "built without CUDA kernels"
            pytest.fail(f"{op} has no compiled CUDA kernel (torchfast._C: {why}); build torchfast against "
                        "a CUDA torch with TORCHFAST_CUDA=1 (scripts/gpu_check.sh does)")


def _check(x, g):
    """Forward and backward of the CUDA kernels on (x, g) against the float64 reference."""
    y = OPS.swish(x)
    dx = OPS.swish_backward(g, x)
    torch.cuda.synchronize()  # a kernel fault surfaces here, in the test that caused it
    x64 = x.double()
    assert_close(y, swish_reference(x64), dtype=x.dtype)
    assert_close(dx, swish_backward_reference(g.double(), x64), dtype=x.dtype, what="grad x")


# n = k * (elements per vector) + r: around one vector, one 256-thread block of vectors, and a size
# that needs several trips of the grid-stride loop ("loop": 3 full grids of the device, plus 3).
SIZES = [(0, 1), (1, -1), (1, 0), (1, 1), (2, -1), (2, 1), (256, -1), (256, 0), (256, 1), ("loop", 3)]


@pytest.mark.parametrize("k,r", SIZES, ids=[f"{k}x{r:+d}" for k, r in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference_around_vector_sizes(dtype, k, r):
    vec = _vec_elems(dtype)
    if k == "loop":
        props = torch.cuda.get_device_properties(0)
        k = 3 * props.multi_processor_count * props.max_threads_per_multi_processor
    n = k * vec + r
    x = torch.randn(n, device="cuda", dtype=dtype) * 4
    _check(x, torch.randn_like(x))


@pytest.mark.parametrize(
    "dtype,offset",
    [(d, o) for d in DTYPES for o in range(1, _vec_elems(d))],
    ids=[f"{d}-{o}" for d in DTYPES for o in range(1, _vec_elems(d))],
)
def test_misaligned_pointers_take_the_scalar_path(dtype, offset):
    """A view starting `offset` elements into its storage is not 16-byte aligned: the kernel must not
    issue vector loads on it (a misaligned vector load faults). Each pointer is tested alone."""
    n = 4099
    x_base = torch.randn(n + offset, device="cuda", dtype=dtype) * 4
    g_base = torch.randn(n + offset, device="cuda", dtype=dtype)
    x_mis, g_mis = x_base[offset:], g_base[offset:]
    x_al, g_al = x_base[:n], g_base[:n]
    assert x_mis.is_contiguous() and x_mis.data_ptr() % 16 != 0 and x_al.data_ptr() % 16 == 0
    _check(x_mis, g_al)  # misaligned x (forward and backward)
    _check(x_al, g_mis)  # misaligned grad_out only


def test_tensor_over_2_31_elements_bfloat16():
    """64-bit indexing: 2^31 + 1027 elements, the last 1027 past the vector loop, both on the vector
    path (aligned) and on the scalar path (a view at element 1), where every index crosses 2^31."""
    n = 2**31 + 1027
    need = 2 * 2 * n + (1 << 30)  # bf16 input and one output at a time, plus slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    base = torch.empty(n + 1, device="cuda", dtype=torch.bfloat16).uniform_(-8, 8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.cat([
        torch.arange(0, 4096, device="cuda"),
        torch.arange(2**31 - 4096, n, device="cuda"),  # across 2^31 and the whole tail
        torch.randint(0, n, (1 << 16,), device="cuda", generator=gen),
    ])
    for name, x in (("aligned", base[:n]), ("misaligned", base[1:])):
        y = OPS.swish(x)
        torch.cuda.synchronize()
        xs = x[idx].double()
        assert_close(y[idx], swish_reference(xs), dtype=torch.bfloat16, what=f"swish ({name})")
        del y
        g = x if name == "aligned" else base[:n]  # all-aligned: vector path; else scalar path
        dx = OPS.swish_backward(g, x)
        torch.cuda.synchronize()
        assert_close(dx[idx], swish_backward_reference(g[idx].double(), xs), dtype=torch.bfloat16,
                     what=f"grad x ({name})")
        del dx


def test_runs_on_the_current_stream():
    """Work queued on a side stream before the op must finish before the kernel reads its input.

    On the side stream, a sleep then a copy fill x; the kernel, queued after them on the same stream,
    must see the copied values. Had it been launched on another stream (the default one), it would run
    during the sleep and compute swish(0) = 0."""
    n = 1 << 20
    src = torch.randn(n, device="cuda") * 4
    g = torch.randn(n, device="cuda")
    x = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() != torch.cuda.default_stream()
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU time on the side stream
        x.copy_(src)
        y = OPS.swish(x)
        dx = OPS.swish_backward(g, x)
    side.synchronize()
    assert_close(y, swish_reference(src.double()), dtype=torch.float32)
    assert_close(dx, swish_backward_reference(g.double(), src.double()), dtype=torch.float32, what="grad x")


def test_runs_on_the_device_of_its_input():
    """With another device current, the kernel must run on the input's device (device guard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices to check the device guard")
    x = torch.randn(10007, device="cuda:1") * 4
    g = torch.randn_like(x)
    with torch.cuda.device(0):
        y = OPS.swish(x)
        dx = OPS.swish_backward(g, x)
    torch.cuda.synchronize(1)
    assert y.device == x.device and dx.device == x.device
    assert_close(y, swish_reference(x.double()))
    assert_close(dx, swish_backward_reference(g.double(), x.double()), what="grad x")


SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0,
           -89.0, -100.0, 1e4, -1e4]


@pytest.mark.parametrize("path", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_follow_torch_silu(dtype, path):
    """NaN and +-Inf come out where torch's own CUDA silu puts them: swish(-inf) = NaN, swish(inf) = inf.
    17 elements: on the vector path they fill whole vectors and a one-element tail (-inf), for every
    dtype; the scalar path gets the same values through a view at element 1."""
    values = SPECIAL + [1.0, float("-inf")]
    if path == "vector":
        x = torch.tensor(values, device="cuda", dtype=dtype)
    else:
        x = torch.tensor([0.0] + values, device="cuda", dtype=dtype)[1:]
        assert x.data_ptr() % 16 != 0
    g = torch.ones_like(x)
    y = OPS.swish(x)
    dx = OPS.swish_backward(g, x)
    expected_y = F.silu(x)
    expected_dx = torch.ops.aten.silu_backward(g, x)
    for got, want, what in ((y, expected_y, "swish"), (dx, expected_dx, "grad x")):
        for test in (torch.isnan, torch.isinf):
            assert torch.equal(test(got), test(want)), (
                f"{what}: {test.__name__} at {test(got).nonzero().flatten().tolist()}, "
                f"torch's silu at {test(want).nonzero().flatten().tolist()} (x = {x.tolist()})")
    assert_close(y, swish_reference(x.double()), dtype=dtype)
    assert_close(dx, swish_backward_reference(g.double(), x.double()), dtype=dtype, what="grad x")
