"""torchfast.ops.linear: F.linear with the float32 CPU GEMMs through oneDNN where that library is the
faster one. The fast path must be exactly F.linear to float32 rounding (values, gradients, double
backward, NaN), must really run where it says (counted, not assumed), and must step aside wherever
something else would notice it: autocast, other dtypes, small GEMMs, forward AD, functorch, tracing,
export, compile, tensor subclasses. Also the SwiGLU paths that use it and optimize's "linear" rule."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.ops import linear as L
from torchfast.testing import assert_close

ONEDNN = L._onednn_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch was built without oneDNN for this CPU")
# (2 x 256 tokens) x 256 -> 256: 2^25 multiply-adds, above the 2^24 threshold.
X_SHAPE, IN, OUT = (2, 256, 256), 256, 256


@pytest.fixture
def onednn(monkeypatch):
    """The oneDNN backend forced on (this CPU may not pick it by itself), with every oneDNN GEMM
    counted: calls["n"] is how many ran."""
    if not ONEDNN:
        pytest.skip("torch was built without oneDNN for this CPU")
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "onednn")
    monkeypatch.setattr(L, "_BACKEND_FOR_COMPILE", "onednn")  # what compiled graphs use
    calls = {"n": 0}
    real = L.onednn_linear

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(L, "onednn_linear", counting)
    return calls


def _data(bias=True, x_shape=X_SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(OUT, x_shape[-1], generator=g) / x_shape[-1] ** 0.5
    b = torch.randn(OUT, generator=g) if bias else None
    return x, w, b


def _grads(fn, x, w, b, grad_out):
    ts = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*ts, *([None] if b is None else []))
    y.backward(grad_out)
    return y.detach(), [t.grad for t in ts]


def _as_accurate_as_f_linear(got, ref32, ref64, what):
    """got is no further from the float64 result than F.linear's own float32 result is (4x margin:
    both are one float32 GEMM, summed in another order)."""
    err, ref_err = (got.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert err <= 4 * ref_err + 1e-7, f"{what}: max abs error {err:.2e}, F.linear's {ref_err:.2e}"


LOOSE = {"rtol": 1e-4, "atol": 1e-5}  # a chain of float32 GEMMs summed in another order than torch's


def test_backend_setting(monkeypatch):
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "blas")
    assert L.cpu_matmul_backend() == "blas"
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "onednn")
    assert L.cpu_matmul_backend() == ("onednn" if ONEDNN else "blas")
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "auto")
    vendor = L._cpu_vendor()
    amd = vendor in ("AuthenticAMD", "HygonGenuine")
    assert L.cpu_matmul_backend() == ("onednn" if ONEDNN and amd else "blas")
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "fastest")
    with pytest.raises(ValueError, match="TORCHFAST_CPU_MATMUL must be one of"):
        L.cpu_matmul_backend()
    assert torchfast.build_info()["cpu_matmul"] in ("onednn", "blas", "invalid TORCHFAST_CPU_MATMUL")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["3d", "2d", "transposed"])
def test_matches_float64_reference(onednn, bias, layout):
    x, w, b = _data(bias)
    if layout == "2d":
        x = x.reshape(-1, IN)
    elif layout == "transposed":  # a non-contiguous input, read through its strides
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous()
    grad_out = torch.randn(*x.shape[:-1], OUT)
    y, grads = _grads(L.linear, x, w, b, grad_out)
    assert onednn["n"] == 2  # forward and grad-input GEMMs
    y32, grads32 = _grads(F.linear, x, w, b, grad_out)
    b64 = None if b is None else b.double()
    y64, grads64 = _grads(F.linear, x.double(), w.double(), b64, grad_out.double())
    _as_accurate_as_f_linear(y, y32, y64, "output")
    for i, (got, g32, g64) in enumerate(zip(grads, grads32, grads64)):
        _as_accurate_as_f_linear(got, g32, g64, f"gradient {i}")


def test_gradient_subsets_and_no_grad(onednn):
    x, w, b = _data()
    grad_out = torch.randn(*X_SHAPE[:-1], OUT)
    # Only the weight wants a gradient (a first layer): no grad-input GEMM.
    wr = w.clone().requires_grad_()
    L.linear(x, wr, b).backward(grad_out)
    assert onednn["n"] == 1
    g2, x2 = grad_out.reshape(-1, OUT), x.reshape(-1, IN)
    _as_accurate_as_f_linear(wr.grad, g2.t() @ x2, g2.double().t() @ x2.double(), "weight gradient")
    with torch.no_grad():
        y = L.linear(x, w, b)
    assert y.grad_fn is None and onednn["n"] == 2
    assert_close(y, F.linear(x.double(), w.double(), b.double()).float(), **LOOSE)


def test_double_backward_matches_f_linear(onednn):
    """A gradient penalty: d/dw |d/dx sum(y^2)|^2, through the first backward's graph."""
    x, w, b = _data()
    outs = []
    for fn, dt in ((L.linear, torch.float32), (F.linear, torch.float32), (F.linear, torch.float64)):
        xr, wr = (t.to(dt, copy=True).requires_grad_() for t in (x, w))
        (gx,) = torch.autograd.grad(fn(xr, wr, b.to(dt)).square().sum(), xr, create_graph=True)
        gx.square().sum().backward()
        outs.append((gx.detach(), wr.grad))
    assert onednn["n"] >= 1
    for what, got, ref32, ref64 in zip(("input gradient", "penalty's weight gradient"), *outs):
        _as_accurate_as_f_linear(got, ref32, ref64, what)


def test_nan_and_inf_propagate_as_in_f_linear(onednn):
    x, w, b = _data()
    x[0, 3, 5] = float("nan")
    x[1, 7, 9] = float("inf")
    w[11, 9] = 0.0  # inf * 0 = nan in both
    got, want = L.linear(x, w, b), F.linear(x, w, b)
    assert onednn["n"] == 1
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert_close(got[finite], want[finite], **LOOSE)


def test_steps_aside(onednn):
    """Each of these is F.linear itself: no oneDNN call, and the result F.linear gives."""
    x, w, b = _data()

    def check(fn, expect_calls=0):
        before = onednn["n"]
        fn()
        assert onednn["n"] - before == expect_calls, fn

    with torch.autocast("cpu", dtype=torch.bfloat16):
        check(lambda: L.linear(x, w, b))
        assert L.linear(x, w, b).dtype == torch.bfloat16
    check(lambda: L.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    check(lambda: L.linear(x[:, :8], w, b))  # 2^20 multiply-adds: below the threshold
    check(lambda: L.linear(x[0, 0], w, b))  # 1-D input
    check(lambda: L.linear(x.double(), w.double(), b.double()))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        check(lambda: L.linear(dual, w, b))
        tangent = torch.autograd.forward_ad.unpack_dual(L.linear(dual, w, b)).tangent
    assert_close(tangent, F.linear(torch.ones_like(x), w))
    check(lambda: torch.func.vmap(lambda t: L.linear(t, w, b))(x))
    check(lambda: torch.func.grad(lambda t: L.linear(t, w, b).sum())(x))
    check(lambda: torch.jit.trace(lambda t: L.linear(t, w, b), (x,), check_trace=False))
    check(lambda: torch.export.export(torchfast.nn.Linear(IN, OUT), (x,)))
    check(lambda: torch.onnx.export(torchfast.nn.Linear(IN, OUT), (x,), io.BytesIO(), dynamo=False))
    # A different error for a wrong shape would be a different contract: it is F.linear's own.
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        L.linear(x, w[:, :8], b)


def test_tensor_subclass_weight_is_left_to_torch(onednn):
    class Tagged(torch.Tensor):
        pass

    x, w, b = _data()
    y = L.linear(x, w.as_subclass(Tagged), b)
    assert onednn["n"] == 0 and isinstance(y, Tagged)


def test_linear_module_and_compile(onednn):
    """torchfast.nn.Linear (with and without activation) runs the oneDNN op eagerly and keeps it in a
    torch.compile graph (fullgraph, forward and backward); torch.export gets aten.linear."""
    torch.manual_seed(0)
    ref = nn.Linear(IN, OUT)
    for act in (None, "gelu"):
        m = torchfast.nn.Linear.from_linear(ref, act)
        x = torch.randn(X_SHAPE, requires_grad=True)
        want = ref(x) if act is None else F.gelu(ref(x))
        (want_gx,) = torch.autograd.grad(want.square().sum(), x)
        before = onednn["n"]
        got = m(x)
        assert onednn["n"] == before + 1
        assert_close(got, want, **LOOSE)
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        got = compiled(x)
        (gx,) = torch.autograd.grad(got.square().sum(), x)
        assert onednn["n"] == before + 3  # eager forward, compiled forward and grad-input GEMM
        assert_close(got, want, **LOOSE)
        assert_close(gx, want_gx, **LOOSE)
    graph = torch.export.export(m, (x.detach(),)).graph_module.code
    assert "_onednn_linear" not in graph and "linear" in graph


def test_onednn_linear_operator():
    """The operator behind the fast path: opcheck (schema, fake kernel, autograd registration), and
    its own errors when called directly with what it does not take."""
    if not ONEDNN:
        pytest.skip("torch was built without oneDNN for this CPU")
    op = torch.ops.torchfast._onednn_linear.default
    x, w, b = _data()
    for args in ((x, w, b), (x.reshape(-1, IN), w, None), (x, w.t().contiguous().t(), b)):
        args = tuple(None if a is None else a.clone().requires_grad_() for a in args)
        torch.library.opcheck(op, args)
    with pytest.raises(ValueError, match="argument 'weight' must be a float32 CPU tensor"):
        op(x, w.double(), b)
    with pytest.raises(ValueError, match=r"'x' \(2, 256, 256\) and 'weight' \(256, 8\)"):
        op(x, w[:, :8], b)


@pytest.mark.parametrize("cls", [torchfast.nn.SwiGLU, torchfast.nn.GeGLU])
@pytest.mark.parametrize("train", [True, False])
def test_gated_mlp_uses_it(onednn, cls, train):
    torch.manual_seed(0)
    mlp = cls(IN, 512)
    x = torch.randn(X_SHAPE, requires_grad=train)
    with torch.set_grad_enabled(train):
        y = mlp(x)
    assert onednn["n"] == 3  # gate, up, down
    plain = mlp.down_proj  # the same module, called plainly in float64
    m64 = cls(IN, 512, dtype=torch.float64)
    m64.load_state_dict(mlp.state_dict())
    x64 = x.detach().double().requires_grad_(train)
    with torch.set_grad_enabled(train):
        y64 = m64(x64)
    assert_close(y, y64.float(), **LOOSE)
    if train:
        grad = torch.randn_like(y)
        y.backward(grad)
        y64.backward(grad.double())
        assert onednn["n"] == 6  # + the grad-input GEMMs of gate, up and down (down's in glu_down)
        assert_close(x.grad, x64.grad.float(), **LOOSE)
        for p, p64 in zip(mlp.parameters(), m64.parameters()):
            assert_close(p.grad, p64.grad.float(), **LOOSE)
    assert plain is mlp.down_proj


def test_hooked_projection_runs_its_own_call(onednn):
    torch.manual_seed(0)
    mlp = torchfast.nn.SwiGLU(IN, 512)
    seen = []
    mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    mlp(torch.randn(X_SHAPE))
    assert seen == [torch.Size([*X_SHAPE[:-1], 512])]


def _wide_mlp():
    return nn.Sequential(
        nn.Linear(IN, 512), nn.SiLU(), nn.Linear(512, OUT), nn.LayerNorm(OUT), nn.Linear(OUT, 4)
    )


def test_optimize_linear_rule(onednn):
    torch.manual_seed(0)
    model = _wide_mlp()
    model[2].register_forward_pre_hook(lambda m, i: None)
    opt, report = torchfast.optimize(model, example_inputs=torch.randn(2, 8, IN))
    assert {r.name: r.rule for r in report.replaced} == {"0 + 1": "linear_act", "3": "layer_norm"}
    # '2' has a hook; '4' (256 x 4 weights) is too small to ever gain.
    left = {(s.name, s.rule, s.reason) for s in report.left_alone}
    assert left == {("2", "linear", "unsupported configuration")}
    model[2]._forward_pre_hooks.clear()
    opt, report = torchfast.optimize(model, example_inputs=torch.randn(2, 8, IN))
    assert {r.name: r.new for r in report.replaced if r.rule == "linear"} == {"2": "torchfast.nn.Linear"}
    assert type(opt[2]) is torchfast.nn.Linear and opt[2].weight is not model[2].weight  # a deep copy
    assert opt.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(X_SHAPE)
    before = onednn["n"]
    assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    assert onednn["n"] > before
    _, report = torchfast.optimize(model, exclude="linear", verify=False)
    assert [s.reason for s in report.left_alone if s.rule == "linear"] == ["excluded"]


def test_optimize_linear_rule_only_where_it_helps(monkeypatch):
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "blas")
    _, report = torchfast.optimize(_wide_mlp(), verify=False)
    assert "linear" not in {r.rule for r in report.replaced} | {s.rule for s in report.left_alone}
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "onednn")
    _, report = torchfast.optimize(_wide_mlp().bfloat16(), verify=False)  # bf16: torch uses oneDNN already
    assert "linear" not in {r.rule for r in report.replaced}
