"""The Triton kernels of rms_norm, add_rms_norm and layer_norm (torchfast/triton/rms_norm.py, layer_norm.py): numerics against the
float64 references, forward, backward and parameter gradients, the AMP dtype pairs, autograd and the
operators' eager registrations.

Without a GPU these run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with one, on CUDA. Tracing (opcheck's fake tensors, torch.compile) needs a GPU:
those tests are marked `gpu`. The interpreter rounds fp32 -> bf16 by truncation where a GPU rounds to
nearest; the references below are therefore built on the kernels' own rounded h (add_rms_norm), and
bf16 results may be one ulp off instead of half of one: inside the bf16 tolerance.
"""

import pytest
import torch

import torchfast
from torchfast.ops.layer_norm import layer_norm_reference
from torchfast.ops.rms_norm import rms_norm_reference
from torchfast.testing import assert_close

from ..ops.norm_helpers import ops_run_during, saved_tensors_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (activation dtype, parameter dtype): same dtype, and the AMP pairs
PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
PAIR_IDS = [f"{str(a).split('.')[1]}-{str(p).split('.')[1]}" for a, p in PAIRS]
SHAPES = [(2, 3, 33), (5, 1)]  # leading dims and a row shorter than its block; one-element rows


def _leaves(shape, dtype, pdtype, affine=True):
    torch.manual_seed(sum(shape))
    n = shape[-1]
    x = (torch.randn(shape, device=DEVICE, dtype=dtype) * 2 + 0.5).requires_grad_()
    w = (torch.rand(n, device=DEVICE, dtype=pdtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(n, device=DEVICE, dtype=pdtype).requires_grad_() if affine else None
    return x, w, b


def _check_against_reference(fn, reference, leaves, dtype, grads_out, what):
    """fn(*leaves) and its gradients against autograd of the float64 reference on the same inputs."""
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    params = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, params, grads_out)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    ref = reference(*leaves64)
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    ref_grads = torch.autograd.grad(ref, [t for t in leaves64 if t is not None], [g.double() for g in grads_out])
    for o, r in zip(outs, ref, strict=True):
        assert o.dtype == dtype and o.is_contiguous()
        assert_close(o, r, dtype=dtype, what=f"{what} output")
    for name, (got, exp, leaf) in zip("xrwb", zip(grads, ref_grads, params)):
        assert got.dtype == leaf.dtype
        # parameter gradients are sums over rows, accumulated in fp32: an absolute slack for fp32
        atol = 1e-5 if leaf.dim() == 1 and got.dtype == torch.float32 else None
        assert_close(got, exp, dtype=got.dtype, atol=atol, what=f"{what} grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, pdtype", PAIRS, ids=PAIR_IDS)
def test_rms_norm_matches_reference(shape, dtype, pdtype):
    x, w, _ = _leaves(shape, dtype, pdtype)
    g = torch.randn(shape, device=DEVICE, dtype=dtype)
    _check_against_reference(lambda x, w: torchfast.rms_norm(x, w, eps=1e-6, impl="triton"),
                             lambda x, w: rms_norm_reference(x, w, eps=1e-6), [x, w], dtype, [g], "rms_norm")
    _check_against_reference(lambda x: torchfast.rms_norm(x, eps=1e-5, impl="triton"),
                             lambda x: rms_norm_reference(x, eps=1e-5), [x], dtype, [g], "rms_norm, no weight")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, pdtype", PAIRS, ids=PAIR_IDS)
def test_add_rms_norm_matches_reference_on_its_own_h(shape, dtype, pdtype):
    x, w, _ = _leaves(shape, dtype, pdtype)
    r = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    y, h = torchfast.add_rms_norm(x, r, w, eps=1e-6, impl="triton")
    assert_close(h, x.detach().double() + r.detach().double(), dtype=dtype, what="h")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    dx, dr, dw = torch.autograd.grad((y, h), (x, r, w), (gy, gh))
    assert torch.equal(dx, dr)
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rms_norm_reference(h64, w64, eps=1e-6)
    dh64, dw64 = torch.autograd.grad(y64, (h64, w64), gy.double())
    assert_close(y, y64, dtype=dtype)
    assert_close(dx, dh64 + gh.double(), dtype=dtype, what="grad x")
    assert_close(dw, dw64, dtype=pdtype, atol=1e-5 if pdtype != torch.float64 else None, what="grad weight")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, pdtype", PAIRS, ids=PAIR_IDS)
def test_layer_norm_matches_reference(shape, dtype, pdtype):
    x, w, b = _leaves(shape, dtype, pdtype)
    g = torch.randn(shape, device=DEVICE, dtype=dtype)
    _check_against_reference(lambda x, w, b: torchfast.layer_norm(x, w, b, eps=1e-5, impl="triton"),
                             lambda x, w, b: layer_norm_reference(x, w, b, eps=1e-5), [x, w, b], dtype, [g],
                             "layer_norm")
    _check_against_reference(lambda x, b: torchfast.layer_norm(x, None, b, impl="triton"),
                             lambda x, b: layer_norm_reference(x, None, b), [x, b], dtype, [g],
                             "layer_norm, bias only")


def test_many_rows_split_across_programs_sum_the_weight_gradient():
    """100 rows over several programs (each sums its rows' weight gradient), against float64."""
    x = torch.randn(100, 40, device=DEVICE, requires_grad=True)
    w = torch.rand(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    g = torch.randn(100, 40, device=DEVICE)
    _check_against_reference(lambda x, w: torchfast.rms_norm(x, w, impl="triton"),
                             lambda x, w: rms_norm_reference(x, w), [x, w], torch.float32, [g], "rms_norm")
    _check_against_reference(lambda x, w, b: torchfast.layer_norm(x, w, b, impl="triton"),
                             lambda x, w, b: layer_norm_reference(x, w, b), [x, w, b], torch.float32, [g],
                             "layer_norm")


def test_statistics_match_the_native_ops():
    from torchfast.triton.layer_norm import layer_norm_fwd
    from torchfast.triton.rms_norm import rms_norm_fwd

    x = torch.randn(6, 50, device=DEVICE, dtype=torch.bfloat16)
    y, rstd = rms_norm_fwd(x, None, 1e-6)
    assert rstd.dtype == torch.float32 and rstd.shape == (6,)
    assert_close(rstd, torch.rsqrt(x.double().square().mean(-1) + 1e-6), dtype=torch.float32)
    y, mean, rstd = layer_norm_fwd(x, None, None, 1e-5)
    assert_close(mean, x.double().mean(-1), dtype=torch.float32)
    assert_close(rstd, torch.rsqrt(x.double().var(-1, unbiased=False) + 1e-5), dtype=torch.float32)


def test_use_impl_runs_the_triton_ops_and_backward_saves_what_native_saves():
    x = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    w = torch.ones(24, device=DEVICE, requires_grad=True)
    with torchfast.use_impl("triton"):
        names = [op._schema.name for op in ops_run_during(
            lambda: (torchfast.rms_norm(x, w).sum() + torchfast.layer_norm(x, w, w).sum()
                     + sum(t.sum() for t in torchfast.add_rms_norm(x, x, w))).backward())]
        saved, _ = saved_tensors_of(lambda: torchfast.rms_norm(x, w))
    for op in ("rms_norm_triton", "rms_norm_backward_triton", "layer_norm_triton", "layer_norm_backward_triton",
               "add_rms_norm_triton"):
        assert f"torchfast::{op}" in names, op
    assert not {"torchfast::rms_norm", "torchfast::layer_norm"} & set(names)
    assert [tuple(t.shape) for t in saved if t is not w] == [(4, 24), (4,)]


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(3, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for fn in (lambda x, w: torchfast.rms_norm(x, w, impl="triton"),
               lambda x, w: torchfast.layer_norm(x, w, w, impl="triton"),
               lambda x, w: torchfast.add_rms_norm(x, x * 2, w, impl="triton")):
        assert torch.autograd.gradcheck(fn, (x, w))
        assert torch.autograd.gradgradcheck(fn, (x, w))


def test_autocast_takes_low_precision_activations_with_fp32_weights_as_they_are():
    x = torch.randn(3, 16, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(16, device=DEVICE) + 0.5
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        y = torchfast.rms_norm(x, w, impl="triton")
        z = torchfast.layer_norm(x, w, w, impl="triton")
    assert y.dtype == z.dtype == torch.bfloat16
    assert_close(y, rms_norm_reference(x.double(), w.double()), dtype=torch.bfloat16)
    assert_close(z, layer_norm_reference(x.double(), w.double(), w.double()), dtype=torch.bfloat16)


def test_opcheck_schema_and_autograd_registration():
    """The parts of opcheck that run eagerly (fake-tensor and compile parts: test_opcheck_gpu)."""
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    w = torch.rand(5, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.torchfast.rms_norm_triton.default, (x, w, 1e-6), test_utils=utils)
    torch.library.opcheck(torch.ops.torchfast.add_rms_norm_triton.default, (x, x.detach(), w, 1e-6),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.torchfast.layer_norm_triton.default, (x, w, w, 1e-5), test_utils=utils)


def test_bad_input_gets_clear_errors():
    # (Rows longer than one block are not an error: tests/triton/test_norm_rows.py runs them.)
    with pytest.raises(RuntimeError, match=r"torchfast\.layer_norm: argument 'weight' has shape \(3,\)"):
        torchfast.layer_norm(torch.randn(2, 4, device=DEVICE), torch.ones(3, device=DEVICE), impl="triton")


@pytest.mark.gpu
def test_opcheck_and_compile_gpu():
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(256, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.torchfast.rms_norm_triton.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.torchfast.layer_norm_triton.default, (x, w, w, 1e-5))
    torch.library.opcheck(torch.ops.torchfast.add_rms_norm_triton.default, (x, x.detach(), w, 1e-6))
    fn = lambda x, w: torchfast.rms_norm(x, w, impl="triton") + torchfast.layer_norm(x, w, w, impl="triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    g = torch.randn_like(x)
    eager = torch.autograd.grad(fn(x, w), (x, w), g)
    got = torch.autograd.grad(compiled(x, w), (x, w), g)
    for a, e in zip(got, eager):
        assert_close(a, e.double(), dtype=a.dtype, atol=1e-2)
