"""Numerics and operator behaviour of torchfast.swiglu / torchfast.geglu (separate and packed), and the
SwiGLU / GeGLU modules."""

import pytest
import torch
import torch.nn.functional as F

import torchfast
from torchfast.ops._activations import act_fn
from torchfast.ops.glu import geglu_reference, glu_backward_reference, swiglu_reference
from torchfast.testing import assert_close

from ..conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PAIR_IDS = ["2d", "3d", "1d-odd", "empty", "0d", "chunk-halves", "gaps", "channels_last", "transposed-gate"]
PACKED_IDS = ["2d", "3d", "H1027", "empty", "rowview", "transposed", "1d"]
# (public function kwargs, activation name of the reference)
VARIANTS = {
    "swiglu": ({}, "swish"),
    "geglu-none": ({"approximate": "none"}, "gelu"),
    "geglu-tanh": ({"approximate": "tanh"}, "gelu_tanh"),
}


def _fn(variant):
    kw, _ = VARIANTS[variant]
    return (lambda *a, **k: torchfast.geglu(*a, **kw, **k)) if kw else torchfast.swiglu


def _reference(gate, up, g, act):
    g64, u64 = gate.detach().double(), up.detach().double()
    return act_fn(act, g64) * u64, *glu_backward_reference(g.double(), g64, u64, act=act)


def _check_pair(variant, gate, up, dtype):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = _fn(variant)(gate, up)
    g = torch.randn_like(y)
    dg, du = (
        torch.autograd.grad(y, (gate, up), g) if y.numel() else (torch.zeros_like(gate), torch.zeros_like(up))
    )
    ref_y, ref_dg, ref_du = _reference(gate, up, g, VARIANTS[variant][1])
    assert y.dtype == dtype and y.shape == gate.shape
    assert y.stride() == torch.empty_like(gate).stride()  # the fake kernel's promise
    assert_close(y, ref_y, dtype=dtype)
    assert_close(dg, ref_dg, dtype=dtype, what="grad gate")
    assert_close(du, ref_du, dtype=dtype, what="grad up")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(PAIR_IDS)), ids=PAIR_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_match_reference(variant, device, dtype, case):
    (gate, up), _ = torchfast.REGISTRY["swiglu"].sample_inputs(device, dtype)[case]
    _check_pair(variant, gate, up, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(PACKED_IDS)), ids=PACKED_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_matches_separate_halves_exactly(variant, device, dtype, case):
    """swiglu(x) == swiglu(*x.chunk(2, -1)) bitwise, forward and backward (same kernel, halves read in
    place), and both match the float64 reference."""
    ((x,), _) = torchfast.REGISTRY["swiglu_packed"].sample_inputs(device, dtype)[case]
    fn = _fn(variant)
    xp = x.detach().requires_grad_()
    y = fn(xp)
    assert y.shape == (*x.shape[:-1], x.shape[-1] // 2) and y.is_contiguous()
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, xp, g) if y.numel() else (torch.zeros_like(x),)
    gate, up = x.detach().chunk(2, dim=-1)
    y2 = fn(gate.contiguous(), up.contiguous())
    dg, du = (
        torch.ops.torchfast.swiglu_backward(g, gate.contiguous(), up.contiguous())
        if variant == "swiglu"
        else torch.ops.torchfast.geglu_backward(g, gate.contiguous(), up.contiguous(), **VARIANTS[variant][0])
    )
    assert torch.equal(y, y2)
    assert torch.equal(dx, torch.cat([dg, du], dim=-1))
    ref_y, ref_dg, ref_du = _reference(gate, up, g, VARIANTS[variant][1])
    assert_close(y, ref_y, dtype=dtype)
    assert_close(dx, torch.cat([ref_dg, ref_du], dim=-1), dtype=dtype, what="grad x")


@pytest.mark.parametrize("isa", torchfast._ext.runnable_cpu_isas() or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa_variant_matches_reference(isa, dtype, restore_cpu_isa):
    """Each compiled ISA variant; 40003 elements cross the parallel grain with a vector tail, and a
    packed 11 x 2 * 3001 input walks rows with a tail in each."""
    if isa == "none":
        pytest.skip("torchfast._C is not built: no CPU ISA variants to check")
    torchfast._ext.set_cpu_isa(isa)
    assert torchfast._ext.active_cpu_isa() == isa
    gate, up = torch.randn(40003, dtype=dtype) * 4, torch.randn(40003, dtype=dtype)
    packed = torch.randn(11, 2 * 3001, dtype=dtype) * 4
    for variant in VARIANTS:
        _check_pair(variant, gate, up, dtype)
        _check_pair(variant, *packed.chunk(2, dim=-1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_special_values_follow_float64_math(variant, dtype):
    """NaN/Inf in gate (with finite up) and in up (with gates whose activation is representable) give
    the float64 values of act(gate) * up and its gradients. Not checked: an infinite `up` times an
    activation that underflows the dtype (gate < ~-88 for float32 swish), where 0 * inf = NaN here and
    in torch's own composite alike."""
    act = VARIANTS[variant][1]
    gate_vals = [
        float("-inf"),
        float("inf"),
        float("nan"),
        -0.0,
        0.0,
        5.0,
        -5.0,
        20.0,
        -20.0,
        -89.0,
        -104.0,
        1e10,
        -1e10,
        1e30,
        -1e30,
        3e38,
    ]
    gate = torch.tensor(gate_vals, dtype=dtype).repeat_interleave(2)
    up = torch.tensor([1.0, -0.5], dtype=dtype).repeat(len(gate_vals))
    gate2 = torch.tensor([-0.0, 0.0, 3.0, -3.0, 1e-30], dtype=dtype).repeat_interleave(3)
    up2 = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype).repeat(5)
    gate, up = torch.cat([gate, gate2]), torch.cat([up, up2])
    g = torch.ones_like(gate)
    ref_y, ref_dg, ref_du = _reference(gate, up, g, act)
    y = _fn(variant)(gate, up)
    bwd = (
        torch.ops.torchfast.swiglu_backward
        if variant == "swiglu"
        else lambda *a: torch.ops.torchfast.geglu_backward(*a, **VARIANTS[variant][0])
    )
    dg, du = bwd(g, gate, up)
    for got, exp, what in ((y, ref_y, "output"), (dg, ref_dg, "grad gate"), (du, ref_du, "grad up")):
        assert torch.equal(got.isnan(), exp.isnan()), (what, gate, up, got, exp)
        assert_close(got, exp, dtype=dtype, what=what)


def _saved_bytes(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(*inputs)
    y.sum().backward()
    return saved, sum(t.numel() * t.element_size() for t in saved)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_saves_only_the_inputs(variant):
    """Saved: gate and up (packed: x), nothing computed; the eager composite also keeps act(gate)."""
    gate = torch.randn(64, 32, requires_grad=True)
    up = torch.randn(64, 32, requires_grad=True)
    saved, nbytes = _saved_bytes(_fn(variant), gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    assert nbytes == 2 * gate.numel() * 4
    x = torch.randn(64, 64, requires_grad=True)
    saved, nbytes = _saved_bytes(_fn(variant), x)
    assert len(saved) == 1 and saved[0] is x and nbytes == x.numel() * 4
    _, eager_bytes = _saved_bytes(lambda g, u: F.silu(g) * u, gate, up)
    assert eager_bytes == 3 * gate.numel() * 4


def test_backward_graph_has_the_backward_ops_packed_and_separate():
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    def fn(x, gate, up):
        return torchfast.swiglu(x) + torchfast.geglu(gate, up, approximate="tanh")

    x = torch.randn(4, 16, requires_grad=True)
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    backend = AotEagerAndRecordGraphs()
    out = torch.compile(fn, fullgraph=True, backend=backend)(x, gate, up)
    grads = torch.autograd.grad(out.square().sum(), (x, gate, up))
    eager = fn(x, gate, up)
    eager_grads = torch.autograd.grad(eager.square().sum(), (x, gate, up))
    assert_close(out, eager, dtype=torch.float32)
    for a, b in zip(grads, eager_grads):
        assert_close(a, b, dtype=torch.float32, what="grad")
    bw = backend.bw_graphs[0].code
    assert "torchfast.swiglu_packed_backward.default" in bw and "torchfast.geglu_backward.default" in bw


def test_autocast_promotes_mixed_gate_and_up_to_their_common_dtype():
    """Under autocast a bf16 gate with an fp32 up runs in fp32 (promote_types) and gradients come back
    in each input's dtype; equal dtypes run as they are. Outside autocast, mixed dtypes are an error."""
    gate = torch.randn(6, 10, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(6, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torchfast.swiglu(gate, up)
        y_same = torchfast.geglu(gate, up.bfloat16())
        y_c = torch.compile(lambda g, u: torchfast.swiglu(g, u), fullgraph=True)(gate, up)
    assert y.dtype == y_c.dtype == torch.float32 and y_same.dtype == torch.bfloat16
    assert_close(y, F.silu(gate.double()) * up.double(), dtype=torch.float32)
    assert_close(y_c, y.double(), dtype=torch.float32)
    y.sum().backward()
    assert gate.grad.dtype == torch.bfloat16 and up.grad.dtype == torch.float32
    with pytest.raises(
        TypeError, match=r"torchfast\.swiglu: 'gate' has dtype BFloat16 but 'up' has dtype Float"
    ):
        torchfast.swiglu(gate.detach(), up.detach())


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_bad_inputs_get_clear_errors_naming_op_and_argument(op):
    fn = getattr(torchfast, op)
    with pytest.raises(
        RuntimeError, match=rf"torchfast\.{op}: 'gate' has shape \(3, 4\) but 'up' has shape \(3, 5\)"
    ):
        fn(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(
        ValueError,
        match=rf"torchfast\.{op}: with 'up' omitted, argument 'gate' is taken as a "
        r"packed \[\.\.\., 2H\] tensor .* but it is of odd width 7",
    ):
        fn(torch.randn(3, 7))
    with pytest.raises(ValueError, match=rf"torchfast\.{op}: .* but it is 0-dimensional"):
        fn(torch.tensor(1.0))
    with pytest.raises(TypeError, match=rf"torchfast\.{op}: argument 'up' has dtype torch.int64"):
        fn(torch.randn(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=rf"torchfast\.{op}_packed: argument 'x' has dtype torch.int32"):
        fn(torch.ones(4, dtype=torch.int32))
    if torchfast._ext.built():  # the ops check too, for callers of torch.ops.torchfast.*
        packed = getattr(torch.ops.torchfast, op + "_packed")
        with pytest.raises(
            ValueError, match=rf"torchfast\.{op}_packed: argument 'x' has an odd last dimension \(7\)"
        ):
            packed(torch.randn(3, 7))
        with pytest.raises(
            RuntimeError, match=rf"torchfast\.{op}: 'gate' has shape \[3, 4\] but 'up' has shape"
        ):
            getattr(torch.ops.torchfast, op)(torch.randn(3, 4), torch.randn(3, 5))
        with pytest.raises(TypeError, match=rf"torchfast\.{op}: argument 'gate' has dtype Long"):
            getattr(torch.ops.torchfast, op)(
                torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64)
            )
        with pytest.raises(
            RuntimeError, match=rf"torchfast\.{op}_packed_backward: 'grad_out' has shape \[3, 4\]"
        ):
            getattr(torch.ops.torchfast, op + "_packed_backward")(torch.randn(3, 4), torch.randn(3, 10))
    if op == "geglu":
        with pytest.raises(
            ValueError, match=r"torchfast\.geglu: argument 'approximate' must be 'none' or 'tanh'"
        ):
            fn(torch.randn(3), torch.randn(3), approximate="erf")
        if torchfast._ext.built():
            with pytest.raises(ValueError, match=r"torchfast\.geglu: argument 'approximate' must be"):
                torch.ops.torchfast.geglu(torch.randn(3), torch.randn(3), approximate="erf")


def test_references_and_impl_selection():
    x = torch.randn(5, 12)
    assert torch.equal(torchfast.swiglu(x, impl="reference"), swiglu_reference(x))
    assert_close(torchfast.swiglu(x, impl="native"), swiglu_reference(x.double()), dtype=torch.float32)
    with torchfast.use_impl("reference"):
        assert torch.equal(torchfast.geglu(x, approximate="tanh"), geglu_reference(x, approximate="tanh"))


class _LlamaMLP(torch.nn.Module):
    """The MLP of Llama-style models as transformers writes it (act_fn(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden, inter, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("kind", ["swiglu", "geglu-none", "geglu-tanh"])
def test_modules_load_llm_mlp_checkpoints_and_match(kind):
    if kind == "swiglu":
        ours, act = torchfast.nn.SwiGLU(16, 40), F.silu
    else:
        approx = kind.split("-")[1]
        ours, act = torchfast.nn.GeGLU(16, 40, approximate=approx), lambda t: F.gelu(t, approximate=approx)
    ref = _LlamaMLP(16, 40, act)
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    assert sorted(ours.state_dict()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x = torch.randn(3, 5, 16)
    y, y_ref = ours(x), ref(x)
    assert_close(y, y_ref.double(), dtype=torch.float32)
    grads = torch.autograd.grad(y.sum(), list(ours.parameters()))
    ref_grads = torch.autograd.grad(y_ref.sum(), list(ref.parameters()))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b.double(), dtype=torch.float32, atol=1e-5, what="grad")


def test_module_constructor_bias_and_repr():
    m = torchfast.nn.GeGLU(8, 16, bias=True, approximate="tanh")
    assert m.gate_proj.bias is not None and m.down_proj.bias is not None
    assert repr(m).startswith(
        "GeGLU(\n  approximate='tanh'\n  (gate_proj): Linear(in_features=8, out_features=16"
    )
    assert repr(torchfast.nn.SwiGLU(8, 16)).startswith("SwiGLU(\n  (gate_proj): Linear(in_features=8")
    with pytest.raises(
        ValueError, match=r"torchfast\.nn\.GeGLU: argument 'approximate' must be 'none' or 'tanh'"
    ):
        torchfast.nn.GeGLU(8, 16, approximate="exact")
