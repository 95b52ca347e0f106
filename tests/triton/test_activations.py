"""The Triton kernels of bias_act and swiglu/geglu (torchfast/triton/bias_act.py, glu.py): numerics
against the float64 references for every activation and dtype on the registry's sample shapes,
gradients (double backward included), the bias-gradient reduction, saved tensors, autocast, errors.

Without a GPU they run on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA tensors. Tracing a Triton op (opcheck's fake-tensor tests, torch.compile) works on a
GPU only, so those tests are marked `gpu`. The interpreter rounds fp32 -> bf16 by truncation, so bf16
results may be one bf16 ulp off instead of half of one: inside the bf16 tolerance.
"""

import pytest
import torch

import torchfast
from torchfast.ops._activations import ACTS, act_fn
from torchfast.ops.bias_act import bias_act_backward_reference, bias_act_reference
from torchfast.ops.glu import glu_backward_reference
from torchfast.testing import assert_close, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GLU = {
    "swiglu": ({}, "swish"),
    "geglu": ({"approximate": "none"}, "gelu"),
    "geglu-tanh": ({"approximate": "tanh"}, "gelu_tanh"),
}


def _grads(y, leaves, g):
    if y.numel() == 0:
        return [torch.zeros_like(t) for t in leaves]
    return torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(9))
def test_bias_act_matches_reference(case, dtype):
    (x, bias), kw = torchfast.REGISTRY["bias_act"].sample_inputs(DEVICE, dtype)[case]
    leaves = [x.requires_grad_()] + ([bias.requires_grad_()] if bias is not None else [])
    y = torchfast.bias_act(x, bias, impl="triton", **kw)
    g = torch.randn_like(y)
    grads = _grads(y, leaves, g)
    b64 = None if bias is None else bias.detach().double()
    ref_dx, ref_db = bias_act_backward_reference(g.double(), x.detach().double(), b64, **kw)
    assert y.dtype == dtype
    assert y.stride() == (torch.empty_like(x) if bias is None else x.new_empty(x.shape)).stride()
    assert_close(y, bias_act_reference(x.detach().double(), b64, **kw), dtype=dtype)
    assert_close(grads[0], ref_dx, dtype=dtype, what="grad x")
    if bias is not None:
        r, a = tolerance(dtype)
        scale = ref_db.abs().max().item() if ref_db.numel() else 0.0
        assert_close(grads[1], ref_db, dtype=dtype, atol=a + r * scale, what="grad bias")


@pytest.mark.parametrize("act", ACTS)
def test_bias_act_every_activation_and_a_multi_slice_reduction(act):
    """100 rows x 150 columns: several row slices and column blocks in the bias-gradient reduction."""
    x = torch.randn(100, 150, device=DEVICE) * 3
    bias = torch.randn(150, device=DEVICE)
    g = torch.randn_like(x)
    dx, db = torch.ops.torchfast.bias_act_backward_triton(g, x, bias, act)
    ref_dx, ref_db = bias_act_backward_reference(g.double(), x.double(), bias.double(), act=act)
    assert_close(
        torch.ops.torchfast.bias_act_triton(x, bias, act),
        bias_act_reference(x.double(), bias.double(), act=act),
    )
    assert_close(dx, ref_dx, what="grad x")
    assert_close(db, ref_db, atol=1e-4, what="grad bias")


@pytest.mark.parametrize("op", GLU)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(9))
def test_glu_matches_reference(op, dtype, case):
    (gate, up), _ = torchfast.REGISTRY["swiglu"].sample_inputs(DEVICE, dtype)[case]
    kw, act = GLU[op]
    fn = torchfast.swiglu if op == "swiglu" else torchfast.geglu
    gate, up = gate.requires_grad_(), up.requires_grad_()
    y = fn(gate, up, impl="triton", **kw)
    g = torch.randn_like(y)
    dg, du = _grads(y, [gate, up], g)
    g64, u64 = gate.detach().double(), up.detach().double()
    ref_dg, ref_du = glu_backward_reference(g.double(), g64, u64, act=act)
    assert y.stride() == torch.empty_like(gate).stride()
    assert_close(y, act_fn(act, g64) * u64, dtype=dtype)
    assert_close(dg, ref_dg, dtype=dtype, what="grad gate")
    assert_close(du, ref_du, dtype=dtype, what="grad up")


@pytest.mark.parametrize("op", GLU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(7))
def test_glu_packed_matches_separate(op, dtype, case):
    ((x,), _) = torchfast.REGISTRY["swiglu_packed"].sample_inputs(DEVICE, dtype)[case]
    kw, act = GLU[op]
    fn = torchfast.swiglu if op == "swiglu" else torchfast.geglu
    x = x.requires_grad_()
    y = fn(x, impl="triton", **kw)
    assert y.is_contiguous() and y.shape == (*x.shape[:-1], x.shape[-1] // 2)
    g = torch.randn_like(y)
    (dx,) = _grads(y, [x], g)
    gate, up = x.detach().double().chunk(2, dim=-1)
    ref_dg, ref_du = glu_backward_reference(g.double(), gate, up, act=act)
    assert_close(y, act_fn(act, gate) * up, dtype=dtype)
    assert_close(dx, torch.cat([ref_dg, ref_du], dim=-1), dtype=dtype, what="grad x")


def test_gradcheck_and_gradgradcheck_float64():
    x = torch.randn(2, 4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=DEVICE, dtype=torch.float64, requires_grad=True)
    for act in ("gelu", "swish"):
        fn = lambda x, b, act=act: torchfast.bias_act(x, b, act=act, impl="triton")
        assert torch.autograd.gradcheck(fn, (x, b)) and torch.autograd.gradgradcheck(fn, (x, b))
    for f in (
        lambda t: torchfast.swiglu(t, impl="triton"),
        lambda t: torchfast.geglu(*t.chunk(2, dim=-1), approximate="tanh", impl="triton"),
    ):
        assert torch.autograd.gradcheck(f, (x,)) and torch.autograd.gradgradcheck(f, (x,))


def test_backward_saves_only_the_inputs():
    x = torch.randn(8, 6, device=DEVICE, requires_grad=True)
    b = torch.randn(6, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torchfast.bias_act(x, b, act="gelu", impl="triton")
        torchfast.swiglu(x, impl="triton")
    assert [t is s for t, s in zip(saved, (x, b, x))] == [True, True, True] and len(saved) == 3


def test_autocast_rules_match_the_native_ops():
    x = torch.randn(4, 6, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(6, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torchfast.bias_act(x, b, act="relu", impl="triton").dtype == torch.bfloat16
        assert torchfast.swiglu(x, b.expand(4, 6), impl="triton").dtype == torch.float32


def test_errors_name_op_and_argument():
    with pytest.raises(
        ValueError, match=r"torchfast\.glu_packed: argument 'x' has an odd last dimension \(5\)"
    ):
        torch.ops.torchfast.glu_packed_triton(torch.randn(2, 5, device=DEVICE), "swish")
    with pytest.raises(RuntimeError, match=r"torchfast\.bias_act: argument 'bias' has shape \[4\]"):
        torch.ops.torchfast.bias_act_triton(
            torch.randn(2, 5, device=DEVICE), torch.randn(4, device=DEVICE), "gelu"
        )
    with pytest.raises(ValueError, match=r"torchfast\.bias_act: unknown activation 'elu'"):
        torch.ops.torchfast.bias_act_triton(torch.randn(2, 5, device=DEVICE), None, "elu")
    with pytest.raises(TypeError, match=r"torchfast\.glu: argument 'up' has dtype torch.int64"):
        torch.ops.torchfast.glu_triton(
            torch.randn(3, device=DEVICE), torch.ones(3, dtype=torch.int64), "swish"
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_gpu(dtype):
    from torch.library import opcheck

    x = torch.randn(5, 8, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(8, device="cuda", dtype=dtype, requires_grad=True)
    opcheck(torch.ops.torchfast.bias_act_triton.default, (x, b, "gelu"))
    opcheck(torch.ops.torchfast.bias_act_triton.default, (x, None, "swish"))
    opcheck(torch.ops.torchfast.glu_triton.default, (x, x.detach().clone().requires_grad_(), "gelu_tanh"))
    opcheck(torch.ops.torchfast.glu_packed_triton.default, (x, "swish"))


@pytest.mark.gpu
def test_compile_fullgraph_forward_backward_matches_eager():
    def fn(x, b):
        return torchfast.bias_act(x, b, act="gelu", impl="triton") + torchfast.swiglu(
            torch.cat([x, x], dim=-1), impl="triton"
        )

    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    b = torch.randn(128, device="cuda", requires_grad=True)
    out_e = fn(x, b)
    grads_e = torch.autograd.grad(out_e.square().sum(), (x, b))
    out_c = torch.compile(fn, fullgraph=True)(x, b)
    grads_c = torch.autograd.grad(out_c.square().sum(), (x, b))
    assert_close(out_c, out_e)
    for a, e in zip(grads_c, grads_e):
        assert_close(a, e, atol=1e-4, what="grad")
