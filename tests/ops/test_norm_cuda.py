"""The CUDA kernels of rms_norm, add_rms_norm and layer_norm (csrc/ops/*/..._cuda.cu), on a GPU only:
the vector and scalar paths, many rows over a grid-stride loop, misaligned parameters, AMP under
torch.autocast("cuda") in float16 and bfloat16. The per-op tests (test_rms_norm.py, test_layer_norm.py)
and the conformance suite also run on CUDA when a GPU is visible."""

import pytest
import torch

import torchfast
from torchfast.ops.layer_norm import layer_norm_reference
from torchfast.ops.rms_norm import rms_norm_reference
from torchfast.testing import assert_close

from .norm_helpers import reference_grads, sum_atol

pytestmark = pytest.mark.gpu

CASES = [
    (torch.float32, torch.float32, 4096 + 3),  # n not a multiple of the vector: scalar path
    (torch.bfloat16, torch.float32, 8192),  # vector path, fp32 weight read 8 at a time
    (torch.float16, torch.float16, 1024),
    (torch.float64, torch.float64, 770),
]


@pytest.mark.parametrize("dtype, pdtype, n", CASES, ids=lambda v: str(v))
def test_cuda_matches_reference_over_many_rows(dtype, pdtype, n):
    rows = 3000  # more rows than resident blocks: the grid-stride loop and the partial-row reduction
    x = torch.randn(rows, n, device="cuda", dtype=dtype).requires_grad_()
    w = (torch.rand(n, device="cuda", dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=pdtype).requires_grad_()
    g = torch.randn(rows, n, device="cuda", dtype=dtype)
    for fn, ref, leaves in ((torchfast.rms_norm, rms_norm_reference, [x, w]),
                            (torchfast.layer_norm, layer_norm_reference, [x, w, b])):
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, g)
        (ref_y,), ref_grads = reference_grads(ref, leaves, {}, [g])
        assert_close(y, ref_y, dtype=dtype)
        assert_close(grads[0], ref_grads[0], dtype=dtype, what="grad x")
        x64, g64 = x.detach().double(), g.double()
        centered = x64 if fn is torchfast.rms_norm else x64 - x64.mean(-1, keepdim=True)
        xhat = centered * torch.rsqrt(centered.square().mean(-1, keepdim=True))
        for name, got, exp, terms in zip(("weight", "bias"), grads[1:], ref_grads[1:], (g64 * xhat, g64)):
            assert got.dtype == pdtype
            assert_close(got, exp, dtype=pdtype, atol=sum_atol(terms, pdtype), what=f"grad {name}")


def test_cuda_misaligned_weight_and_add_rms_norm():
    n = 512
    w_storage = torch.rand(n + 1, device="cuda") + 0.5
    w = w_storage[1:]  # starts 4 bytes into its storage: not 16-byte aligned, the scalar path
    x = torch.randn(64, n, device="cuda")
    r = torch.randn(64, n, device="cuda")
    assert_close(torchfast.rms_norm(x, w), rms_norm_reference(x.double(), w.double()))
    y, h = torchfast.add_rms_norm(x, r, w)
    assert torch.equal(h, x + r)
    assert_close(y, rms_norm_reference(h.double(), w.double()))
    assert torch.equal(torchfast.add_rms_norm(x.bfloat16(), r.bfloat16(), w)[1], x.bfloat16() + r.bfloat16())


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_keeps_fp32_parameters(amp_dtype):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torchfast.nn.RMSNorm(128), torchfast.nn.LayerNorm(128),
                                torch.nn.Linear(128, 8)).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.autocast("cuda", dtype=amp_dtype):
        h = model[0](x)
        y = model[1](h)
        z = model[2](y)
        out = model[3](z)
    assert h.dtype == y.dtype == z.dtype == amp_dtype
    out.float().sum().backward()
    for m in model[1:3]:
        assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    assert_close(y, rms_norm_reference(h.double(), model[1].weight.double()), dtype=amp_dtype)
