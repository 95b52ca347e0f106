"""The CUDA kernels of every op at the edges docs/gpu.md's review lists, on a GPU only (`make gpu-check`
runs them; without a GPU they are skipped, and tests/test_cuda_launch_math.py checks the launch
arithmetic on the host instead):

- rows wider than one block (hidden 65536 / 131072), 0 rows, 1 row, more rows than gridDim.y's 65535;
- element counts past 2^31 and just below it on the scalar path, where bias_act/glu once chose int32
  indices whose grid-stride loop wrapped;
- vocabularies of 1, 7 (below a vector), 50257 (odd), 128256 and 262144, misaligned logits rows;
- every op captured in a CUDA graph: a capture fails on a launch on another stream than the current one
  and on a host synchronization, so replaying it equal to the eager result shows both are absent;
- every op on the second GPU while the first is current (the device guard), where there are two.
Results are compared with the float64 references (the per-op tests hold the full numerics).
"""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops.layer_norm import layer_norm_reference
from torchfast.ops.rms_norm import rms_norm_reference
from torchfast.testing import assert_close

from .norm_helpers import reference_grads, sum_atol

pytestmark = pytest.mark.gpu
OPS = torch.ops.torchfast


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not torchfast.build_info()["cuda_kernels"]:
        pytest.fail(f"torchfast._C has no CUDA kernels ({torchfast._ext.LOAD_ERROR or 'built without them'}); "
                    "build against a CUDA torch with TORCHFAST_CUDA=1 (scripts/gpu_check.sh does)")


def _free_gb():
    return torch.cuda.mem_get_info()[0] / 2**30


def _check_norms(rows, n, dtype=torch.bfloat16, pdtype=torch.float32):
    x = torch.randn(rows, n, device="cuda", dtype=dtype).requires_grad_()
    w = (torch.rand(n, device="cuda", dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=pdtype).requires_grad_()
    g = torch.randn(rows, n, device="cuda", dtype=dtype)
    for fn, ref, leaves in ((torchfast.rms_norm, rms_norm_reference, [x, w]),
                            (torchfast.layer_norm, layer_norm_reference, [x, w, b])):
        y = fn(*leaves, impl="native")
        grads = torch.autograd.grad(y, leaves, g)
        torch.cuda.synchronize()
        (ref_y,), ref_grads = reference_grads(ref, leaves, {}, [g])
        assert_close(y, ref_y, dtype=dtype, what=f"{fn.__name__} {rows}x{n}")
        assert_close(grads[0], ref_grads[0], dtype=dtype, what=f"{fn.__name__} {rows}x{n} grad x")
        # Parameter gradients are sums over rows: the tolerance of such a sum (as tests/ops/test_norm_cuda.py),
        # plus the error of the fp32 row statistics every term's xhat carries, which grows with the row
        # (about sqrt(n) fp32 roundings of the mean and the variance).
        x64, g64 = x.detach().double(), g.double()
        centered = x64 if fn is torchfast.rms_norm else x64 - x64.mean(-1, keepdim=True)
        xhat = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True))
        stat_rel = 4 * n**0.5 * torch.finfo(torch.float32).eps
        for got, exp, terms in zip(grads[1:], ref_grads[1:], (g64 * xhat, g64)):
            atol = sum_atol(terms, pdtype) + stat_rel * float(terms.abs().sum(0).max())
            assert_close(got, exp, dtype=pdtype, atol=atol, what=f"{fn.__name__} {rows}x{n} parameter grad")


@pytest.mark.parametrize("rows, n", [(1, 65536), (3, 131072), (2, 262144), (1, 1), (70000, 64)],
                         ids=["1x65536", "3x131072", "2x262144", "1x1", "70000x64"])
def test_norm_rows_wide_narrow_and_many(rows, n):
    _check_norms(rows, n)


def test_norm_zero_rows():
    x = torch.randn(0, 4096, device="cuda", requires_grad=True)
    w = torch.rand(4096, device="cuda", requires_grad=True)
    y = torchfast.rms_norm(x, w, impl="native")
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert y.shape == dx.shape == (0, 4096) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("numel, offset", [(2**31 - 1000, 1), (2**31 + 24, 0)],
                         ids=["misaligned-scalar-just-below-2^31", "aligned-past-2^31"])
def test_maps_near_and_past_2_31_elements(numel, offset):
    """bias_act without a bias (one flat row) and swiglu over ~2^31 bf16 elements. With offset 1 the
    pointers are misaligned, so the scalar loop runs: its last grid stride passes 2^31 - 1, which an int32
    index wrapped before launch_math.h's fits_int32_loop."""
    if _free_gb() < 4 * (numel + 8) * 2 / 2**30 + 2:
        pytest.skip(f"needs about {4 * numel * 2 / 2**30 + 2:.0f} GB of free GPU memory")
    store = torch.empty(numel + 8, device="cuda", dtype=torch.bfloat16).uniform_(-6, 6)
    x = store[offset:offset + numel]
    y = torchfast.bias_act(x, None, act="swish", impl="native")
    up = torch.ones_like(x)
    z = torchfast.swiglu(x, up, impl="native")
    torch.cuda.synchronize()
    for lo, hi in ((0, 4096), (2**31 - 2**20 - 4096, 2**31 - 2**20), (numel - 4096, numel)):
        xs = x[lo:hi].double()
        expect = xs * torch.sigmoid(xs)
        assert_close(y[lo:hi], expect, dtype=torch.bfloat16, what=f"bias_act[{lo}:{hi}]")
        assert_close(z[lo:hi], expect, dtype=torch.bfloat16, what=f"swiglu[{lo}:{hi}]")


@pytest.mark.parametrize("v", [1, 7, 50257, 128256, 262144])
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "misaligned-rows"])
def test_cross_entropy_vocab_sizes(v, sliced):
    rows = 5
    base = torch.randn(rows, v + 1, device="cuda", dtype=torch.bfloat16) * 3
    # [:, 1:]: every row starts 2 bytes past a 16-byte boundary (and rows are v + 1 apart)
    logits = (base[:, 1:] if sliced else base[:, :v].contiguous()).detach().requires_grad_()
    target = torch.randint(0, v, (rows,), device="cuda")
    target[1] = -100
    loss = torchfast.cross_entropy(logits, target, reduction="sum", label_smoothing=0.1, impl="native")
    (dx,) = torch.autograd.grad(loss, logits)
    l64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(l64, target, reduction="sum", label_smoothing=0.1)
    (ref_dx,) = torch.autograd.grad(ref, l64)
    assert_close(loss, ref, dtype=loss.dtype, what=f"loss V={v}")  # the logits' dtype, as F.cross_entropy
    assert_close(dx, ref_dx, dtype=torch.bfloat16, what=f"grad V={v}")


def test_cross_entropy_many_rows_and_none():
    logits = torch.randn(70000, 8, device="cuda")
    target = torch.randint(0, 8, (70000,), device="cuda")
    assert_close(torchfast.cross_entropy(logits, target, reduction="none", impl="native"),
                 F.cross_entropy(logits.double(), target, reduction="none"))
    empty = torchfast.cross_entropy(logits[:0], target[:0], reduction="none", impl="native")
    assert empty.shape == (0,)


def _op_calls():
    """(name, call) of every CUDA op, forward and backward, on small inputs."""
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    w = torch.rand(512, device="cuda") + 0.5
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 512, (64,), device="cuda")
    x2 = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    hid = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    wl = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    y, rstd = OPS.rms_norm(x, w, 1e-6)
    _, mean, rstd_ln = OPS.layer_norm(x, w, w, 1e-5)
    _, h, rstd_h = OPS.add_rms_norm(x, g, w, 1e-6)
    _, lse = OPS.cross_entropy(x, t)
    _, lse_l, *_ = OPS.linear_cross_entropy(hid, wl, t, reduction="mean")
    gl = torch.ones(64, device="cuda")
    return [
        ("swish", lambda: OPS.swish(x)), ("swish_backward", lambda: OPS.swish_backward(g, x)),
        ("bias_act", lambda: OPS.bias_act(x, b, act="gelu")),
        ("bias_act_backward", lambda: OPS.bias_act_backward(g, x, b, act="gelu")),
        ("swiglu", lambda: OPS.swiglu(x, g)), ("swiglu_backward", lambda: OPS.swiglu_backward(g, x, g)),
        ("geglu_packed", lambda: OPS.geglu_packed(x2)),
        ("geglu_packed_backward", lambda: OPS.geglu_packed_backward(g, x2)),
        ("rms_norm", lambda: OPS.rms_norm(x, w, 1e-6)), ("rms_norm_backward", lambda: OPS.rms_norm_backward(g, x, w, rstd)),
        ("add_rms_norm", lambda: OPS.add_rms_norm(x, g, w, 1e-6)),
        ("add_rms_norm_backward", lambda: OPS.add_rms_norm_backward(g, g, h, w, rstd_h)),
        ("layer_norm", lambda: OPS.layer_norm(x, w, w, 1e-5)),
        ("layer_norm_backward", lambda: OPS.layer_norm_backward(g, x, w, w, mean, rstd_ln)),
        ("cross_entropy", lambda: OPS.cross_entropy(x, t, label_smoothing=0.1)),
        ("cross_entropy_backward", lambda: OPS.cross_entropy_backward(gl, x, t, lse)),
        ("linear_cross_entropy", lambda: OPS.linear_cross_entropy(hid, wl, t, reduction="mean", chunk_size=16,
                                                                   grad_mask=7)),
        ("linear_cross_entropy_backward",
         lambda: OPS.linear_cross_entropy_backward(gl, hid, wl, t, None, lse_l, chunk_size=16)),
    ]


def _flat(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]


def test_every_op_captures_in_a_cuda_graph():
    """torch.cuda.graph captures on a side stream: a kernel launched on any other stream, or a
    device-to-host synchronization, makes the capture fail."""
    for name, call in _op_calls():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = _flat(call())
            _flat(call())  # warm-up: cuBLAS handles and workspaces are made outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _flat(call())
        graph.replay()
        torch.cuda.synchronize()
        assert len(captured) == len(eager), name
        for c, e in zip(captured, eager):
            assert_close(c, e.double(), dtype=c.dtype, what=f"{name} replayed")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_op_runs_on_the_device_of_its_inputs():
    """With cuda:0 current, inputs on cuda:1: the CUDAGuard of every op must move the launches there
    (else they read cuda:1 memory from cuda:0 kernels: an illegal address or wrong results)."""
    with torch.cuda.device(1):
        calls = _op_calls()  # inputs made on cuda:1
        expected = {name: [o.cpu() for o in _flat(call())] for name, call in calls}
    with torch.cuda.device(0):
        for name, call in calls:
            got = _flat(call())
            torch.cuda.synchronize(1)
            for o, e in zip(got, expected[name]):
                assert o.device == torch.device("cuda", 1), name
                assert_close(o.cpu(), e.double(), dtype=o.dtype, what=f"{name} on cuda:1")
