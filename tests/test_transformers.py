"""torchfast.transformers.patch on real transformers code: tiny random-init models of each supported
family (configs built here, nothing downloaded), each patched model against an unpatched twin with the
same weights: logits, loss and every parameter gradient in float32 (tight) and under bfloat16 autocast
(no less accurate than the unpatched model, both against float32), which torchfast ops really run,
unpatch, a second instance, a 20-step AdamW loss curve, greedy generate, save/load, Trainer, ONNX."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers",
                                   reason="torchfast.transformers needs transformers (extra hf)")

import torchfast.transformers as tft  # noqa: E402

VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread is faster than two fighting over a loaded machine (10 ms against
    100+ ms per training step measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return transformers.Qwen3Config(**_COMMON, head_dim=16)
    if family == "gemma2":
        return transformers.Gemma2Config(**_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if family == "phi3":  # partial rotary, as Phi-4-mini: 8 of each head's 16 dims rotated
        return transformers.Phi3Config(**_COMMON, partial_rotary_factor=0.5)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                       eos_token_id=2)
    raise KeyError(family)


_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM",
            "gpt2": "GPT2LMHeadModel"}
FAMILIES = list(_CLASSES)
# What must be replaced per family: GPT-2 has no rotary (learned positions).
_PARTS = {f: {"rms_norm", "mlp", "rope", "loss"} for f in FAMILIES}
_PARTS["gpt2"] = {"layer_norm", "mlp", "loss"}
# torchfast ops that must run in a patched training step (aten ops are recorded by their packet name).
_OPS = {f: {"rms_norm", "rope", "swiglu", "linear_cross_entropy"} for f in FAMILIES}
_OPS["gemma2"] = {"rms_norm", "rope", "geglu", "linear_cross_entropy"}
_OPS["gpt2"] = {"layer_norm", "bias_act", "linear_cross_entropy"}


def _twins(family: str, seed: int = 0):
    """(unpatched, patched twin with the same weights, report)."""
    torch.manual_seed(seed)
    cls = getattr(transformers, _CLASSES[family])
    ref = cls(_config(family)).float()
    model = copy.deepcopy(ref)
    report = tft.patch(model)
    return ref, model, report


def _batch(seed: int = 1, batch: int = 2, tokens: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, tokens), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt left out of the loss, as in instruction tuning
    return ids, labels


class _Ops(TorchDispatchMode):
    """Records the torchfast ops that run (forward and backward), and how often each ran."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchfast":
            self.names.add(func._opname)
            self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))


def _step(model, ids, labels, autocast: bool = False):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _named(name: str):
    return lambda message: f"{name}: {message}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_loss_grads_logits_match_and_unpatch_restores(family):
    ref, model, report = _twins(family)
    assert _PARTS[family] <= report.parts(), str(report)
    assert report.model == _CLASSES[family]
    ids, labels = _batch()

    with _Ops() as ops:
        out, grads = _step(model, ids, labels)
    assert _OPS[family] <= ops.names, f"torchfast ops that ran: {sorted(ops.names)}"
    assert out.logits is None  # the fused loss never builds them
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=_named(name))

    # Inference (eval, no labels): the class's forward with the patched modules; logits as unpatched.
    model.eval(), ref.eval()
    with torch.no_grad(), _Ops() as ops:
        logits = model(input_ids=ids).logits
    assert ops.names, "no torchfast op ran in the patched model's inference"
    with torch.no_grad(), _Ops() as ops_ref:
        logits_ref = ref(input_ids=ids).logits
    assert not ops_ref.names, f"the unpatched twin ran torchfast ops: {ops_ref.names}"
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=2e-5)

    tft.unpatch(model)
    assert not tft.is_patched(model)
    with torch.no_grad(), _Ops() as ops:
        logits = model(input_ids=ids).logits
    assert not ops.names, f"torchfast ops still run after unpatch: {ops.names}"
    assert torch.equal(logits, logits_ref)


def _bf16_errors(family):
    """Relative L2 errors (loss, worst parameter gradient) of bf16 autocast runs against float32, for the
    patched and the unpatched model."""
    ref, model, _ = _twins(family)
    ids, labels = _batch()
    exact, exact_grads = _step(ref, ids, labels)
    errors = {}
    for label, m in (("patched", model), ("unpatched", ref)):
        out, grads = _step(m, ids, labels, autocast=True)
        worst = max(_rel(g, exact_grads[n]) for n, g in grads.items())
        errors[label] = (_rel(out.loss, exact.loss), worst)
    return errors


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt2"])
def test_bf16_autocast_no_less_accurate_than_unpatched(family):
    errors = _bf16_errors(family)
    (loss_p, grad_p), (_, grad_u) = errors["patched"], errors["unpatched"]
    assert loss_p < 1e-2, errors
    # bf16 rounds at other places in the fused ops (once per op instead of once per aten op): allow
    # the patched model a margin over the unpatched one, but not a different order of error.
    assert grad_p <= max(2 * grad_u, 2e-2), errors


def test_second_instance_of_the_same_class_is_unaffected():
    ref, _, _ = _twins("llama")
    other = copy.deepcopy(ref)  # made after `model` was patched, same class
    ids, labels = _batch()
    with _Ops() as ops:
        out, grads = _step(other, ids, labels)
    assert not ops.names
    out_ref, grads_ref = _step(ref, ids, labels)
    assert torch.equal(out.logits, out_ref.logits) and torch.equal(out.loss, out_ref.loss)
    assert all(torch.equal(g, grads_ref[n]) for n, g in grads.items())


def test_phi3_module_level_rotary_fused_per_instance():
    """Phi-3's attention calls its module's apply_rotary_pos_emb (no kernel hook): the patched instance
    runs torchfast.rope once per layer forward and rope_backward once per layer backward, with partial
    rotary; the module's function and the class are untouched, so an unpatched Phi-3 made afterwards
    runs no torchfast op and computes bit for bit what a never-patched one does."""
    from transformers.models.phi3 import modeling_phi3

    original = modeling_phi3.apply_rotary_pos_emb
    class_forward = modeling_phi3.Phi3Attention.forward
    ref, model, report = _twins("phi3")
    rows = [r for r in report.replaced if r.part == "rope"]
    assert [r.name for r in rows] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert {r.how for r in rows} == {"instance forward (module-level apply_rotary_pos_emb)"}
    assert modeling_phi3.apply_rotary_pos_emb is original
    assert modeling_phi3.Phi3Attention.forward is class_forward
    assert model.model.rotary_emb(torch.zeros(1), torch.arange(3)[None])[0].shape[-1] == 8  # 8 of 16 dims

    ids, labels = _batch()
    with _Ops() as ops:
        out, grads = _step(model, ids, labels)
    layers = model.config.num_hidden_layers
    assert ops.counts.get("rope") == layers and ops.counts.get("rope_backward") == layers, ops.counts
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"):
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=_named(name))

    other = copy.deepcopy(ref)  # a second, unpatched Phi-3 made after the patch
    with _Ops() as ops:
        out_other, grads_other = _step(other, ids, labels)
    assert not ops.names, f"the unpatched Phi-3 ran torchfast ops: {ops.counts}"
    assert torch.equal(out_other.logits, out_ref.logits) and torch.equal(out_other.loss, out_ref.loss)
    assert all(torch.equal(g, grads_ref[n]) for n, g in grads_other.items())

    tft.unpatch(model)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    with torch.no_grad(), _Ops() as ops:
        model.eval()(input_ids=ids)
    assert not ops.names


def test_attention_projections_run_torchfast_linear(monkeypatch):
    """With oneDNN as the float32 GEMM library (forced here, the default on AMD CPUs), the attention
    projections of a Llama wide enough for it (256 x 256 weights, 256 tokens: 2^24 multiply-adds per
    call) run torchfast.ops.linear: one _onednn_linear per projection forward and one per input gradient
    (the MLP's three through its fused forward). Loss and gradients match the unpatched model to float32
    rounding, the state_dict is unchanged, unpatch and exclude="linear" take it away."""
    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "onednn")
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config)
    model = copy.deepcopy(ref)
    report = tft.patch(model)
    linears = sorted(r.name for r in report.replaced if r.part == "linear")
    attn = [f"model.layers.0.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    # lm_head (VOCAB x 256) too; in training with labels the fused loss reads its weight instead.
    assert linears == ["lm_head", *attn], str(report)
    assert list(model.state_dict()) == list(ref.state_dict())
    ids, labels = _batch(batch=2, tokens=128)
    with _Ops() as ops:
        out, grads = _step(model, ids, labels)
    assert ops.counts.get("_onednn_linear") == 2 * (4 + 3), ops.counts
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=_named(name))
    with torch.no_grad(), _Ops() as ops:  # eval: lm_head builds the logits, through oneDNN too
        logits = model.eval()(input_ids=ids).logits
    assert ops.counts.get("_onednn_linear") == 4 + 3 + 1, ops.counts
    torch.testing.assert_close(logits, ref.eval()(input_ids=ids).logits, rtol=1e-5, atol=2e-5)

    tft.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    report = tft.patch(model, exclude="linear")
    assert "linear" not in report.parts() and ("linear", "excluded") in {(s.part, s.reason)
                                                                          for s in report.left_alone}
    with _Ops() as ops:
        _step(model, ids, labels)
    assert ops.counts.get("_onednn_linear") == 2 * 3, ops.counts  # the MLP's only


def test_rebind_refuses_a_wrapper_it_cannot_copy():
    """A decorator that does not keep the wrapped function in a closure cell cannot be rebuilt around the
    copy: with_global says so (patch then reports the rotary as left) instead of dropping the wrapper."""
    from torchfast.transformers import _rebind

    def inner(x):
        return apply_rotary_pos_emb(x)  # noqa: F821 (a global of this module's namespace)

    def template(x):
        return registry["f"](x) + 1  # noqa: F821 (a global of the wrapper's own namespace)

    # A decorator from another module (its own globals) that looks its function up in a registry.
    wrapper = types.FunctionType(template.__code__, {"registry": {"f": inner}})
    wrapper.__wrapped__ = inner
    with pytest.raises(_rebind.CannotRebind, match="cannot be copied"):
        _rebind.with_global(wrapper, globals(), "apply_rotary_pos_emb", abs)
    copied = _rebind.with_global(inner, globals(), "apply_rotary_pos_emb", abs)
    assert copied(-3) == 3 and "apply_rotary_pos_emb" not in globals()


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    ref, model, _ = _twins("gemma2")
    twin = copy.deepcopy(model)
    assert tft.is_patched(twin)
    ids, labels = _batch()
    with _Ops() as ops:
        out, _ = _step(twin, ids, labels)
    assert {"rms_norm", "rope", "geglu", "linear_cross_entropy"} <= ops.names
    tft.unpatch(twin)  # the copy's bound forwards and kernelized wrappers are its own
    with _Ops() as ops:
        _step(model, ids, labels)
    assert {"rms_norm", "rope", "geglu", "linear_cross_entropy"} <= ops.names
    with torch.no_grad(), _Ops() as ops:
        twin.eval()(input_ids=ids)
    assert not ops.names
    torch.testing.assert_close(out.loss, _step(ref, ids, labels)[0].loss, rtol=1e-5, atol=1e-6)


def _curve(model, steps: int = 20, seed: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        ids, labels = _batch(seed=seed + step % 2)  # two batches to memorize: the loss must fall
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_20_step_adamw_loss_curve_equal(family):
    """float32, within 1e-4 at every step. Gemma 2 and GPT-2 tie lm_head to the input embeddings: the
    fused loss's weight gradient and the embedding's must add up as unpatched."""
    ref, model, _ = _twins(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family != "llama")
    patched_losses, losses = _curve(model), _curve(ref)
    assert losses[-1] < 0.7 * losses[0], losses  # it does train
    for step, (a, b) in enumerate(zip(patched_losses, losses)):
        assert abs(a - b) <= 1e-4, f"step {step}: patched {a} vs unpatched {b}"
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # Adam divides each gradient by its own running RMS, so entries whose gradient is ~0 amplify rounding
    # differences up to ~lr per step: 1e-3 against weights that moved by up to 20 * lr = 0.06.
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3, msg=_named(name))


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt2"])
def test_greedy_generate_same_tokens(family):
    ref, model, _ = _twins(family)
    ids, _ = _batch(tokens=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with _Ops() as ops:
        tokens = model.eval().generate(ids, **kw)
    assert ops.names
    assert torch.equal(tokens, ref.eval().generate(ids, **kw))


def test_save_pretrained_round_trip(tmp_path):
    ref, model, _ = _twins("qwen3")
    state, state_ref = model.state_dict(), ref.state_dict()
    assert list(state) == list(state_ref)
    assert all(torch.equal(state[k], state_ref[k]) for k in state)
    model.save_pretrained(tmp_path / "patched")
    loaded = type(ref).from_pretrained(tmp_path / "patched")  # plain: nothing of the patch is saved
    assert not tft.is_patched(loaded)
    ids, _ = _batch()
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, want, rtol=0, atol=0)
        tft.patch(loaded)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=2e-5)


def test_exclude_and_report():
    ref, _, _ = _twins("llama")
    model = copy.deepcopy(ref)
    report = tft.patch(model, exclude=["loss", "rope"])
    assert report.parts() == {"rms_norm", "mlp"}
    assert {(s.part, s.reason) for s in report.left_alone} == {("loss", "excluded"), ("rope", "excluded")}
    text = str(report)
    assert "model.layers.*.mlp (x2)" in text and "kernels.kernelize (hook 'RMSNorm')" in text
    ids, labels = _batch()
    out = model.train()(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (2, 12, VOCAB)  # the loss is transformers' own
    d = report.to_dict()
    assert d["model"] == "LlamaForCausalLM" and {r["part"] for r in d["replaced"]} == {"rms_norm", "mlp"}


def test_other_model_names_what_was_left():
    """A model torchfast has no loss for (a sequence classifier): its blocks are patched, the report says
    the loss was left and why."""
    torch.manual_seed(0)
    ref = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(**_COMMON, num_labels=3))
    model = copy.deepcopy(ref)
    report = tft.patch(model)
    assert {"rms_norm", "mlp", "rope"} <= report.parts()
    (left,) = [s for s in report.left_alone if s.part == "loss"]
    assert "Qwen2ForSequenceClassification" in left.old and "LlamaForCausalLM" in left.reason
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=2e-5)


def test_without_the_kernels_package(monkeypatch):
    """With kernels not importable the hooked parts are bound by torchfast itself, and reported so."""
    monkeypatch.setattr(tft, "_kernels", lambda: None)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(_config("llama"))
    model = copy.deepcopy(ref)
    report = tft.patch(model)
    assert "kernels not installed" in report.kernels
    assert {r.how for r in report.replaced} == {"instance forward"}
    assert {"rms_norm", "rope", "mlp", "loss"} <= report.parts()
    ids, labels = _batch()
    with _Ops() as ops:
        out, grads = _step(model, ids, labels)
    assert {"rms_norm", "rope"} <= ops.names
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=_named(name))
    tft.unpatch(model)
    with torch.no_grad(), _Ops() as ops:
        model.eval()(input_ids=ids)
    assert not ops.names


def test_without_kernels_installed_the_rotary_goes_the_module_level_way():
    """With kernels not importable at all, transformers' `use_kernelized_func` is a stub and Llama's
    attention calls its module's apply_rotary_pos_emb directly: patch fuses it like Phi-3's (a copy of
    the forward), and the loss matches. In a subprocess: transformers reads kernels' presence on import."""
    import subprocess
    import sys

    code = """
import copy, sys
sys.modules["kernels"] = None  # not importable
import torch, transformers
import torchfast.transformers as tft
from torch.utils._python_dispatch import TorchDispatchMode
class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.counts = {}
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torchfast":
            self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
torch.manual_seed(0)
ref = transformers.LlamaForCausalLM(config)
model = copy.deepcopy(ref)
report = tft.patch(model)
hows = sorted({r.how for r in report.replaced if r.part == "rope"})
ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
with Ops() as ops:
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
want = ref.train()(input_ids=ids, labels=ids).loss
print(hows, ops.counts.get("rope"), ops.counts.get("rope_backward"), abs(loss.item() - want.item()) < 1e-5)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "['instance forward (module-level apply_rotary_pos_emb)'] 2 2 True", last


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"torchfast.transformers.patch: argument 'model' must be"):
        tft.patch("meta-llama/Llama-2-7b-hf")
    _, model, _ = _twins("llama")
    with pytest.raises(ValueError, match=r"argument 'exclude' has unknown parts \['attention'\]"):
        tft.patch(model, exclude="attention")


def test_onnx_export_of_a_patched_model(tmp_path):
    """The whole patched causal LM (eval, no cache) exports with torchfast's exporter and runs in
    onnxruntime (torchfast.export.onnx verifies it); at opset 23 torchfast's norms and rotary become
    ONNX's RMSNormalization and RotaryEmbedding, which the unpatched model's graph would not hold."""
    onnx = pytest.importorskip("onnx")
    import torchfast.export

    _, model, _ = _twins("llama")

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    ids, _ = _batch()
    result = torchfast.export.onnx(Logits(model).eval(), (ids,), tmp_path / "llama.onnx", opset=23)
    assert result.max_error < 1e-4
    ops = [n.op_type for n in onnx.load(result.path).graph.node]
    assert ops.count("RMSNormalization") == 5  # two per layer and the final norm
    assert ops.count("RotaryEmbedding") >= 2


def test_trainer_runs_the_patched_model(tmp_path):
    """transformers.Trainer on a tiny in-memory dataset: the same logged losses as the unpatched model
    (the Trainer passes num_items_in_batch: the loss is a sum divided by it, as transformers does)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    ref, model, _ = _twins("qwen2")
    data = []
    for i in range(8):
        ids, labels = _batch(seed=10 + i, batch=1)
        data.append({"input_ids": ids[0], "labels": labels[0]})

    def run(m, out):
        args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=4, logging_steps=1,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 learning_rate=1e-3, save_strategy="no", seed=0, disable_tqdm=True)
        trainer = Trainer(model=m, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    with _Ops() as ops:
        losses = run(model, tmp_path / "patched")
    assert "linear_cross_entropy" in ops.names
    losses_ref = run(ref, tmp_path / "unpatched")
    assert len(losses) == 4
    for step, (a, b) in enumerate(zip(losses, losses_ref)):
        assert abs(a - b) <= 1e-4, f"step {step}: patched {a} vs unpatched {b}"
    assert tft.is_patched(model)


def _compiled_step_matches(backend: str, family: str = "llama"):
    torch._dynamo.reset()
    ref, model, _ = _twins(family)
    ids, labels = _batch()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, grads = _step(compiled, ids, labels)
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-6,
                                   msg=_named(name))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_torch_compile_fullgraph_aot_eager(family):
    """The patched model traces as one graph (fullgraph=True: no break in the fused loss forward, the
    kernelized layers, the bound forwards or Phi-3's copied attention forward), forward and backward,
    with the unpatched eager results."""
    _compiled_step_matches("aot_eager", family)


@pytest.mark.slow
def test_torch_compile_inductor():
    """The same under inductor (about a minute of compiling on 2 cores)."""
    _compiled_step_matches("inductor")


def test_bfloat16_model_and_activation_checkpointing():
    """A model cast to bfloat16 (weights too) patches and matches its twin within bf16 rounding; with
    activation checkpointing (transformers re-runs each decoder layer in backward) the float32 loss and
    gradients are the unpatched ones."""
    ref, model, _ = _twins("qwen3")
    ids, labels = _batch()
    low, low_ref = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ref).to(torch.bfloat16)
    assert {"rms_norm", "rope", "mlp"} <= tft.patch(low).parts()
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).logits
        err = (low.eval()(input_ids=ids).logits.float() - want).abs().max().item()
        err_ref = (low_ref.eval()(input_ids=ids).logits.float() - want).abs().max().item()
    assert err <= max(2 * err_ref, 1e-2), (err, err_ref)
    for m in (model, ref):  # transformers >= 5.25 names it activation_checkpointing_enable
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    out, grads = _step(model, ids, labels)
    out_ref, grads_ref = _step(ref, ids, labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=_named(name))


def test_import_does_not_pull_in_transformers():
    """`torchfast.transformers` is reachable from `import torchfast`, and importing it does not import
    the Hugging Face package (patch does, when it runs)."""
    import subprocess
    import sys

    code = ("import sys, torchfast; p = torchfast.transformers.patch; "
            "print('transformers' in sys.modules, 'kernels' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["False", "False"]
