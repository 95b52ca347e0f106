"""torchfast.optimize on models written without torchfast (tests/dropin/models.py): the report, the
numbers (forward and gradients), state_dicts, dtype, DDP, torch.compile and ONNX export; and the bad
inputs: look-alike modules left alone, a verification failure naming the module, argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
import torchfast.export
from torchfast.testing import assert_close

from . import models as M

# name -> (factory, input shape, {qualified name: new module}); only these are replaced.
MODELS = {
    "llama": (
        lambda: M.LlamaStack(layers=1),
        (2, 8, 32),
        {
            "layers.0.input_layernorm": "torchfast.nn.RMSNorm",
            "layers.0.post_attention_layernorm": "torchfast.nn.RMSNorm",
            "layers.0.mlp": "torchfast.nn.SwiGLU",
            "norm": "torchfast.nn.RMSNorm",
        },
    ),
    "gpt2": (
        lambda: M.GPT2Block(),
        (2, 8, 32),
        {
            "ln_1": "torchfast.nn.LayerNorm",
            "ln_2": "torchfast.nn.LayerNorm",
            "mlp.act": "torchfast.nn.GELU(approximate='tanh')",
        },
    ),
    "bert": (
        lambda: M.BertLayer(),
        (2, 8, 32),
        {
            "attention_norm": "torchfast.nn.LayerNorm",
            "output_norm": "torchfast.nn.LayerNorm",
            "ffn.0 + ffn.1": "torchfast.nn.Linear(activation='gelu') + nn.Identity",
        },
    ),
    "cnn": (
        lambda: M.SmallCNN(),
        (2, 3, 12, 12),
        {
            "features.2": "torchfast.nn.Swish",
            "features.4": "torchfast.nn.Swish",
            "head.0 + head.1": "torchfast.nn.Linear(activation='swish') + nn.Identity",
        },
    ),
}
FP32_LOOSE = {"rtol": 1e-4, "atol": 1e-5}  # a model chains several ops, each within one rounding


@pytest.fixture(scope="module")
def optimized():
    """name -> (original, optimized, report, input), built once for the module's tests."""
    out = {}
    for name, (factory, shape, _) in MODELS.items():
        torch.manual_seed(0)
        original = factory()
        x = torch.randn(shape)
        model, report = torchfast.optimize(original, example_inputs=x)
        out[name] = original, model, report, x
    return out


def grads_of(model, x):
    x = x.clone().requires_grad_()
    with torch.random.fork_rng():
        y = model(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    params = dict(getattr(model, "_orig_mod", model).named_parameters())  # compiled: the module's names
    got = torch.autograd.grad(y, [x, *params.values()], g)
    return y, got[0], dict(zip(params, got[1:]))


@pytest.mark.parametrize("name", MODELS)
def test_report_lists_the_expected_swaps(optimized, name):
    original, model, report, _ = optimized[name]
    assert {r.name: r.new for r in report.replaced} == MODELS[name][2], report.table()
    assert report.verification == "passed", report.table()
    assert not report.left_alone, report.table()
    as_dict = report.to_dict()
    assert [r["name"] for r in as_dict["replaced"]] == [r.name for r in report.replaced]
    table = report.table()
    for r in report.replaced:
        assert r.name in table and r.old in table and r.new in table
    # Only children were swapped (setattr on the parent): no torch or user class was patched.
    assert type(original) is type(model) and original is not model
    assert not any(type(m).__module__.startswith("torchfast") for m in original.modules())


@pytest.mark.parametrize("name", MODELS)
def test_outputs_and_gradients_match(optimized, name):
    original, model, _, x = optimized[name]
    original.eval(), model.eval()
    y0, dx0, dp0 = grads_of(original, x)
    y1, dx1, dp1 = grads_of(model, x)
    assert_close(y1, y0, **FP32_LOOSE)
    assert_close(dx1, dx0, **FP32_LOOSE, what="input gradient")
    assert dp1.keys() == dp0.keys()
    for k in dp0:
        assert_close(dp1[k], dp0[k], rtol=1e-4, atol=1e-5 * max(1.0, dp0[k].abs().max().item()), what=k)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trips(optimized, name):
    original, model, _, _ = optimized[name]
    sd = original.state_dict()
    assert list(model.state_dict()) == list(sd)
    fresh = MODELS[name][0]()
    fresh_opt, _ = torchfast.optimize(fresh, verify=False)
    fresh_opt.load_state_dict(sd, strict=True)  # the original's checkpoint loads into the optimized model
    back = MODELS[name][0]()
    back.load_state_dict(fresh_opt.state_dict(), strict=True)  # and back
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_matches_in_onnxruntime(optimized, name, tmp_path):
    _, model, _, x = optimized[name]
    seq = name in ("llama", "gpt2")  # the decoder blocks take any sequence length
    path, max_error = torchfast.export.onnx(model, (x,), tmp_path / f"{name}.onnx", dynamic_sequence=seq)
    assert max_error < 1e-4
    import onnx

    graph = onnx.load(path).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and (bool(dims[1].dim_param) == seq)


@pytest.mark.parametrize("name", MODELS)
def test_no_graph_break(optimized, name):
    _, model, _, x = optimized[name]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_fullgraph_forward_and_backward(optimized):
    _, model, _, x = optimized["llama"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y0, dx0, dp0 = grads_of(model, x)
    y1, dx1, dp1 = grads_of(compiled, x)
    assert_close(y1, y0, **FP32_LOOSE)
    assert_close(dx1, dx0, **FP32_LOOSE)
    for k in dp0:
        assert_close(dp1[k], dp0[k], rtol=1e-4, atol=1e-5 * max(1.0, dp0[k].abs().max().item()), what=k)


def test_after_to_bfloat16():
    torch.manual_seed(0)
    original = M.LlamaStack(layers=1).to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    model, report = torchfast.optimize(original, example_inputs=x)
    assert len(report.replaced) == 4 and report.verification == "passed", report.table()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        reference = copy.deepcopy(original).float()(x.float())
        got, plain = model(x), original(x)
    # no further from the float32 computation than the original bf16 model, within 2x
    assert (got.float() - reference).abs().max() <= 2 * (plain.float() - reference).abs().max() + 1e-3
    # and converting after optimizing works the same
    model32, _ = torchfast.optimize(M.LlamaStack(layers=1), verify=False)
    assert model32.to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_inside_ddp(tmp_path):
    import torch.distributed as dist

    torch.manual_seed(0)
    original = M.SmallCNN()
    model, _ = torchfast.optimize(original)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(4, 3, 12, 12)
        ddp(x).square().sum().backward()
        original(x).square().sum().backward()
        for (k, p), q in zip(model.named_parameters(), original.parameters()):
            assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * max(1.0, q.grad.abs().max().item()), what=k)
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match="before wrapping"):
        torchfast.optimize(nn.DataParallel(original))


# -- look-alikes, configurations, include / exclude ---------------------------------------------------------


class GemmaRMSNorm(nn.Module):
    """Looks like RMSNorm (weight, eps) but scales by (1 + weight)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class Mish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(F.softplus(x))


class LongSequenceNorm(nn.Module):
    """RMSNorm on short inputs; on sequences longer than 16 it (wrongly) drops the eps and the weight:
    it matches on the probes and fails on the model's real inputs."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.5))
        self.variance_epsilon = 0.1

    def forward(self, x):
        if x.dim() == 3 and x.shape[1] > 16:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_lookalikes_are_left_alone_and_reported():
    model = nn.Sequential(nn.Linear(16, 16), GemmaRMSNorm(16), Mish(), nn.Linear(16, 16), Mish())
    x = torch.randn(4, 16)
    new, report = torchfast.optimize(model, example_inputs=x)
    assert not report.replaced
    left = {s.name: s for s in report.left_alone}
    assert set(left) == {"1", "2", "3 + 4", "4"}, report.table()
    assert all(s.reason == "did not match" for s in left.values())
    assert "torchfast.nn.RMSNorm" in left["1"].detail and "max abs error" in left["1"].detail
    assert type(new[1]) is GemmaRMSNorm and type(new[2]) is Mish and type(new[3]) is nn.Linear
    torch.testing.assert_close(new(x), model(x), rtol=0, atol=0)


def test_modules_with_hooks_are_left_alone_and_their_hooks_still_run():
    """Hooks live on the module object, so a replacement would drop them: a hooked LayerNorm, GELU or
    Linear of a Linear + SiLU pair is reported and kept, and its hook fires in the optimized model."""
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append("linear"))
    model[2].register_forward_pre_hook(lambda m, i: seen.append("norm"))
    model[3].register_full_backward_hook(lambda m, gi, go: seen.append("gelu-backward"))
    new, report = torchfast.optimize(model, example_inputs=torch.randn(4, 16))
    assert [r.name for r in report.replaced] == ["1"], report.table()  # the SiLU, on its own
    assert {(s.name, s.reason) for s in report.left_alone} == {
        ("0 + 1", "unsupported configuration"),
        ("2", "unsupported configuration"),
        ("3", "unsupported configuration"),
    }, report.table()
    assert all("has hooks" in s.detail for s in report.left_alone)
    seen.clear()
    new(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert seen == ["linear", "norm", "gelu-backward"]


def test_pruned_model_is_copied_and_its_pruned_layers_kept():
    """A model pruned with torch.nn.utils.prune (before prune.remove) deep-copies (its non-leaf
    `weight` attribute is cloned) and its hooked Linears stay; the rest is optimized and verified."""
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(4, 16)
    new, report = torchfast.optimize(model, example_inputs=x)
    assert [r.name for r in report.replaced] == ["1", "2"] and report.verification == "passed", report.table()
    assert [(s.name, s.reason) for s in report.left_alone] == [("0 + 1", "unsupported configuration")]
    assert (new[0].weight == 0).float().mean() == 0.5
    torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-6)


def test_verification_failure_names_the_module():
    model = nn.Sequential(nn.Linear(8, 8), LongSequenceNorm(8), nn.Linear(8, 8), nn.SiLU())
    with pytest.raises(
        torchfast.OptimizeVerificationError,
        match=r"module '1' \(LongSequenceNorm -> " r"torchfast.nn.RMSNorm\) disagrees",
    ) as err:
        torchfast.optimize(model, example_inputs=torch.randn(2, 32, 8))
    assert err.value.module == "1"
    # On inputs where it behaves, it is replaced; exclude= keeps the original and the rest is verified.
    _, report = torchfast.optimize(model, example_inputs=torch.randn(2, 4, 8))
    assert {r.name for r in report.replaced} == {"1", "2 + 3"}
    _, report = torchfast.optimize(model, example_inputs=torch.randn(2, 32, 8), exclude=["1"])
    assert [r.name for r in report.replaced] == ["2 + 3"] and report.verification == "passed"
    assert [(s.name, s.reason) for s in report.left_alone] == [("1", "excluded")]


class MLPWithDropout(M.LlamaMLP):
    def __init__(self):
        super().__init__(16, 32)
        self.dropout = nn.Dropout(0.1)


class MixtralMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.w1, self.w3 = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.w2 = nn.Linear(32, 16, bias=False)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


def test_gated_mlps_and_unsupported_configurations():
    model = nn.ModuleDict(
        {"a": MixtralMLP(nn.GELU(approximate="tanh")), "b": MLPWithDropout(), "c": MixtralMLP(nn.ReLU())}
    )
    model.forward = None  # a container without forward: nothing to verify
    new, report = torchfast.optimize(model, verify=False)
    assert {r.name: r.new for r in report.replaced} == {
        "a": "GatedMLP(act='gelu_tanh', names=w1/w3/w2)",
        "b.act_fn": "torchfast.nn.Swish",
    }, report.table()
    left = {s.name: s.reason for s in report.left_alone}
    assert left == {"b": "unsupported configuration", "c": "did not match"}, report.table()
    assert list(new.state_dict()) == list(model.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(new["a"](x), model["a"](x))


def test_include_exclude_and_inplace():
    torch.manual_seed(0)
    model = M.LlamaStack(layers=1)
    new, report = torchfast.optimize(model, include="rms_norm")
    assert {r.rule for r in report.replaced} == {"rms_norm"}
    assert {(s.name, s.reason) for s in report.left_alone} == {
        ("layers.0.mlp", "excluded"),
        ("layers.0.mlp.act_fn", "excluded"),
    }
    new, report = torchfast.optimize(model, exclude=["*.mlp", "norm"])
    assert [r.name for r in report.replaced] == [
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "layers.0.mlp.act_fn",
    ]
    assert type(model.norm) is M.LlamaRMSNorm  # inplace=False left the original alone
    same, _ = torchfast.optimize(model, inplace=True)
    assert same is model and type(model.norm) is torchfast.nn.RMSNorm


def test_torch_classes_pair_names_and_verification_states():
    """nn.GELU and torch's own nn.RMSNorm are swapped; a fused pair is excluded by its second name;
    inplace=True keeps the parameter objects; verification says "skipped" when it cannot build inputs
    and "passed" with nothing replaced, in the table and the dict."""
    model = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.RMSNorm(8, eps=1e-5), nn.GELU(approximate="tanh"))
    weight = model[2].weight
    new, report = torchfast.optimize(model, example_inputs=torch.randn(2, 8))
    assert {r.name: r.new for r in report.replaced} == {
        "0 + 1": "torchfast.nn.Linear(activation='swish') + nn.Identity",
        "2": "torchfast.nn.RMSNorm",
        "3": "torchfast.nn.GELU(approximate='tanh')",
    }, report.table()
    _, report = torchfast.optimize(model, exclude="1", example_inputs=torch.randn(2, 8))
    assert ("0 + 1", "excluded") in {(s.name, s.reason) for s in report.left_alone}
    assert "1" not in {r.name for r in report.replaced}  # the SiLU is excluded on its own too
    same, _ = torchfast.optimize(model, inplace=True)
    assert same[2].weight is weight and type(same[2]) is torchfast.nn.RMSNorm

    class Opaque(nn.Module):  # no layer optimize can build inputs from
        def __init__(self):
            super().__init__()
            self.act = nn.SiLU()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.act(x) * self.scale

    _, report = torchfast.optimize(Opaque())
    assert report.verification == "skipped" and "example_inputs" in report.verification_detail
    assert report.to_dict()["verification"]["status"] == "skipped" and "skipped" in report.table()
    _, report = torchfast.optimize(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    assert report.verification == "passed" and report.verification_detail == "nothing was replaced"


def test_shared_module_is_reported():
    act = M.Swish()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), act, nn.Linear(8, 8), act)
    _, report = torchfast.optimize(model)
    assert {(s.name, s.reason) for s in report.left_alone} == {
        ("2", "shared module"),
        ("3 + 4", "shared module"),
        ("4", "shared module"),
    }


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": 3}, TypeError, "argument 'model' must be a torch.nn.Module"),
        ({"include": 5}, TypeError, "argument 'include'"),
        ({"exclude": ["ok", 1]}, TypeError, "argument 'exclude'"),
        ({"example_inputs": 1.0}, TypeError, "argument 'example_inputs'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"model": nn.SiLU(), **kwargs}
    with pytest.raises(error, match=match):
        torchfast.optimize(kwargs.pop("model"), **kwargs)


def test_demo_model_is_plain_pytorch_optimized():
    from torchfast._optimize._demo import optimized_plain_mlp, plain_mlp

    assert not any(type(m).__module__.startswith("torchfast") for m in plain_mlp(4, 8, 2).modules())
    model, report = optimized_plain_mlp(4, 8, 2)
    assert [r.name for r in report.replaced] == ["0 + 1", "2 + 3"] and report.verification == "passed"
    assert [getattr(m, "activation", None) for m in model if isinstance(m, nn.Linear)] == [
        "swish",
        "swish",
        None,
    ]
