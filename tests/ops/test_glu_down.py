"""SwiGLU / GeGLU modules in training keep only gate and up for backward: the product that down_proj
would keep is recomputed (torchfast/nn/_glu_down.py). Same values and gradients as the plain
composition down_proj(glu(gate_proj(x), up_proj(x))), less saved memory, and the plain path wherever
something could observe the down projection (hooks, pruning) or the kernels are not native."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.nn import GeGLU, SwiGLU
from torchfast.testing import assert_close

pytestmark = pytest.mark.skipif(not torchfast._ext.built(), reason="the fused path runs the native kernels")

MODULES = [
    pytest.param(lambda **kw: SwiGLU(32, 80, **kw), F.silu, id="swiglu"),
    pytest.param(lambda **kw: GeGLU(32, 80, **kw), F.gelu, id="geglu"),
    pytest.param(lambda **kw: GeGLU(32, 80, approximate="tanh", **kw),
                 lambda t: F.gelu(t, approximate="tanh"), id="geglu_tanh"),
]


def _plain(m, act, x):
    return m.down_proj(act(m.gate_proj(x)) * m.up_proj(x))


def _grads(m, x, y, g):
    return torch.autograd.grad(y, [x, *m.parameters()], g)


def _saved_activation_bytes(m, fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    params = {p.data_ptr() for p in m.parameters()}
    distinct = {t.data_ptr(): t for t in saved if t.data_ptr() not in params}  # x is saved twice
    return sum(t.numel() * t.element_size() for t in distinct.values())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("make, act", MODULES)
def test_values_and_gradients_equal_the_plain_composition(make, act, bias):
    torch.manual_seed(0)
    m = make(bias=bias).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    ref = _plain(m, act, x)
    assert_close(y, ref, dtype=torch.float64)
    for name, a, b in zip(["x", *dict(m.named_parameters())], _grads(m, x, y, g), _grads(m, x, ref, g)):
        assert_close(a, b, dtype=torch.float64, what=name)
    torch.autograd.gradcheck(lambda t: m(t), (x[:1, :2].detach().requires_grad_(),))


@pytest.mark.parametrize("make, act", MODULES)
def test_backward_keeps_two_intermediates_instead_of_three(make, act):
    m = make(bias=True)
    x = torch.randn(64, 32, requires_grad=True)
    width = 64 * 80 * 4  # one float32 intermediate of 64 tokens x 80 features
    fused = _saved_activation_bytes(m, lambda: m(x))
    plain = _saved_activation_bytes(m, lambda: _plain(m, act, x))
    # Both keep x (for the gate/up weight gradients); the plain one keeps the product as well.
    assert plain - fused >= width, (plain, fused)
    assert fused <= x.numel() * 4 + 2 * width + 1024, fused


@pytest.mark.parametrize("make, act", MODULES)
def test_autocast_bfloat16_matches_the_plain_composition(make, act):
    torch.manual_seed(1)
    m = make(bias=True)
    x = torch.randn(4, 9, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        gate, up = m.gate_proj(x), m.up_proj(x)
        if isinstance(m, SwiGLU):
            h = torchfast.swiglu(gate, up)
        else:
            h = torchfast.geglu(gate, up, approximate=m.approximate)
        ref = m.down_proj(h)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(y, ref)  # the same kernels in the same dtypes
    g = torch.randn_like(y)
    for name, a, b in zip(["x", *dict(m.named_parameters())], _grads(m, x, y, g), _grads(m, x, ref, g)):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype=torch.bfloat16, what=name)


def test_hooks_and_pruning_see_the_down_projection():
    torch.manual_seed(2)
    m = SwiGLU(32, 80, bias=True)
    x = torch.randn(16, 32, requires_grad=True)
    seen = []
    handle = m.down_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = m(x)
    handle.remove()
    assert seen == [torch.Size([16, 32])]
    assert_close(y, _plain(m, F.silu, x), dtype=torch.float32)
    # Pruning reparametrizes the weight through a forward pre-hook: the mask must apply.
    torch.nn.utils.prune.l1_unstructured(m.down_proj, "weight", amount=0.5)
    assert_close(m(x), _plain(m, F.silu, x), dtype=torch.float32)
    assert (m.down_proj.weight == 0).float().mean() == 0.5


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(3)
    m = GeGLU(32, 80, bias=True)
    x = torch.randn(8, 32, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    assert_close(yc, y, dtype=torch.float32)
    for name, a, b in zip(["x", *dict(m.named_parameters())], _grads(m, x, yc, g), _grads(m, x, y, g)):
        assert_close(a, b, dtype=torch.float32, what=name)
