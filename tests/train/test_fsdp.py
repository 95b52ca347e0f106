"""FSDP2 (`fully_shard`, through torchfast.distributed.shard) over models of torchfast modules: two CPU
processes under torchrun (Gloo) against one process in float32, per configuration of
tests/train/fsdp_script.py (which says what each one is), and the errors of bad input.

One torchrun launch runs every default configuration (a launch costs seconds of imports), among
them torch.compile with the aot_eager backend (dynamo and AOTAutograd trace FSDP2's hooks and the
torchfast ops; ~9 s); compiling with inductor has its own launch, marked slow (it builds C++, 20-45 s
here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.train.test_distributed import ROOT, explain, torchrun

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
DEFAULT = ["per-block", "no-reshard", "bf16", "offload", "checkpoint", "optimize", "raw", "compile-aot"]
# a torchfast.transformers-patched Llama, when transformers is installed (the test extra has it)
LAUNCHED = DEFAULT + (["hf"] if HAVE_TRANSFORMERS else [])
# Float32 rounding: the first step's gradients differ only in the order of the batch sums (2 halves
# reduced across ranks vs one batch), measured <= 3.3e-7 of the largest gradient element. Later steps
# start from weights that AdamW already moved apart by such rounding, amplified by its normalisation
# (an element whose gradient is near 0 gets a step of about lr * dg / (|g| + eps)): measured <= 6.7e-6
# for gradients, 3.8e-5 for the final weights. A missing shard, a wrong all-gather or a sum instead of
# a mean of the gradients is an error of order 1.
FIRST_GRAD_TOL, GRAD_TOL, PARAM_TOL, LOSS_TOL = 1e-6, 5e-5, 2e-4, 1e-6


def _launch(tmp_path_factory, configs: list[str], timeout: int) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(str(ROOT / "tests" / "train" / "fsdp_script.py"), str(out), ",".join(configs),
                    cwd=out, timeout=timeout)
    assert proc.returncode == 0 and "FSDP-OK" in proc.stdout, explain(proc)
    return json.loads(Path(out / "results.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, [*LAUNCHED, "errors", "view-control"], timeout=240)


def _check_parity(name: str, r: dict) -> None:
    assert r["status"] == "ok", f"{name}: {r['status']}\n{r.get('traceback', '')}"
    assert r["all_dtensor"] and r["fsdp_modules"] >= 3, f"{name}: the model was not sharded per block"
    worst = max(r["loss_err"])
    assert worst <= LOSS_TOL, f"{name}: global loss vs one process, relative error {worst:.2e}: {r['losses']}"
    for step, errs in enumerate(r["grad_err"]):
        tol = FIRST_GRAD_TOL if step == 0 else GRAD_TOL
        bad = {n: e for n, e in errs.items() if e > tol}
        assert not bad, f"{name}: step {step}: gathered gradients vs one process beyond {tol:.0e}: {bad}"
    bad = {n: e for n, e in r["param_err"].items() if e > PARAM_TOL}
    assert not bad, f"{name}: weights after {len(r['grad_err'])} AdamW steps beyond {PARAM_TOL:.0e}: {bad}"
    assert r["moved"] > 100 * PARAM_TOL, f"{name}: training hardly moved the weights ({r['moved']:.1e})"
    assert r["warnings"] == [], f"{name}: FSDP2 warned that a module returned a view: {r['warnings']}"


@pytest.mark.parametrize("name", DEFAULT)
def test_two_processes_match_one_process(results: dict, name: str):
    """Losses, gathered gradients of every step and final weights of 3 AdamW steps under FSDP2 equal
    one float32 process within float32 rounding; no torchfast module output trips FSDP2's view warning."""
    _check_parity(name, results[name])


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[hf]')")
def test_patched_transformers_model_matches_one_process(results: dict):
    """A transformers Llama after torchfast.transformers.patch (fused norms, MLPs, rotary and the
    linear_cross_entropy loss with tied embeddings), sharded per decoder layer: the same parity with one
    process as the torchfast.nn models."""
    r = results["hf"]
    _check_parity("hf", r)
    assert {"rms_norm", "mlp", "rope", "loss"} <= set(r["patched"]), r["patched"]


def test_uneven_vocab_is_sharded_and_gathered(results: dict):
    """The LM head weight [67, 32] splits 34 + 33 rows over 2 ranks (FSDP2 pads dimension 0), and the
    fused LinearCrossEntropyLoss still sees the whole gathered weight: its gradient matches one process."""
    for name, key in (("per-block", "lm_loss.weight"), ("no-reshard", "lm_head.weight")):
        r = results[name]
        assert r["shards"] == {key: [[34, 32], [67, 32]]}, r["shards"]
        assert r["grad_err"][0][key] <= FIRST_GRAD_TOL


def test_mixed_precision_replays_exactly(results: dict):
    """bf16 parameters with float32 reduction equal, to the bit, one process that runs each rank's half
    through a bfloat16 copy of the float32 weights and averages the gradients in float32: the policy
    does what it says and nothing else."""
    r = results["bf16"]
    assert r["status"] == "ok", r
    assert max(max(e.values()) for e in r["grad_err"]) == 0.0
    assert max(r["param_err"].values()) == 0.0 and max(r["loss_err"]) == 0.0


def test_bad_input_is_refused_by_name_on_both_ranks(results: dict):
    """Every call raised on both ranks before a collective (the worker's barrier after each would hang
    otherwise), naming the module or parameter."""
    m = results["errors"]["messages"]
    assert "module 'layers.1' of the model is a DistributedDataParallel" in m["ddp-inside"], m
    assert m["ddp-over-fsdp"].startswith("ValueError: torchfast.distributed.wrap: module '<root>'"), m
    assert "already sharded" in m["twice"], m
    # the Trainer's default strategy="ddp" would wrap it in DDP: refused, pointing at strategy="fsdp"
    assert ("torchfast.Trainer: module '<root>' of the model is sharded with FSDP2 (fully_shard), but "
            "strategy='ddp'") in m["trainer"] and "pass strategy='fsdp'" in m["trainer"], m
    assert "'layers.2.side.2.weight' (group 'layers.2')" in m["shared-between-blocks"], m
    assert "'layers.0.self_attn.o_proj.weight' (group 'layers.0')" in m["shared-between-blocks"], m


def test_view_warning_control(results: dict):
    """The positive control of the no-view checks: torch's own nn.Linear (bias, 3-D input) returns a
    view, and FSDP2 warns about it in the same worker."""
    assert any("returned a view tensor" in w for w in results["view-control"]["warnings"]), results


def test_compiled_blocks_trace_whole(results: dict):
    """torch.compile (aot_eager) of the sharded blocks: one graph per block (3), no graph break."""
    r = results["compile-aot"]
    assert r["graph_breaks"] == {} and r["frames"] == 3, r


@pytest.mark.slow
def test_two_processes_match_one_process_compiled(tmp_path_factory):
    """The blocks compiled with torch.compile after sharding (inductor on CPU): same parity, one graph
    per block (3) and no graph break: FSDP2's hooks and the torchfast ops trace."""
    r = _launch(tmp_path_factory, ["compile"], timeout=600)["compile"]
    _check_parity("compile", r)
    assert r["graph_breaks"] == {} and r["frames"] == 3, r


# ---- one process --------------------------------------------------------------------------------

def _module_cases():
    import torchfast.nn as tnn

    x3 = lambda *s: torch.randn(2, 3, *s, requires_grad=True)  # noqa: E731
    return {
        "Linear": (tnn.Linear(16, 8), (x3(16),)),
        "Linear-nobias": (tnn.Linear(16, 8, bias=False), (x3(16),)),
        "Linear-swish": (tnn.Linear(16, 8, activation="swish"), (x3(16),)),
        "Swish": (tnn.Swish(), (x3(16),)),
        "GELU": (tnn.GELU(), (x3(16),)),
        "SwiGLU": (tnn.SwiGLU(16, 32), (x3(16),)),
        "GeGLU": (tnn.GeGLU(16, 32), (x3(16),)),
        "RMSNorm": (tnn.RMSNorm(16), (x3(16),)),
        "RMSNorm-2d": (tnn.RMSNorm((4, 4)), (x3(4, 4),)),
        "AddRMSNorm": (tnn.AddRMSNorm(16), (x3(16), x3(16))),
        "AddRMSNorm-2d": (tnn.AddRMSNorm((4, 4)), (x3(4, 4), x3(4, 4))),
        "LayerNorm": (tnn.LayerNorm(16), (x3(16),)),
        "LayerNorm-2d": (tnn.LayerNorm((4, 4)), (x3(4, 4),)),
        "CrossEntropyLoss": (tnn.CrossEntropyLoss(reduction="none"), (x3(16), torch.randint(0, 16, (2, 3)))),
        "LinearCrossEntropyLoss": (tnn.LinearCrossEntropyLoss(16, 40, reduction="none"),
                                   (x3(16), torch.randint(0, 40, (2, 3)))),
    }


CASES = list(_module_cases())


@pytest.mark.parametrize("name", CASES)
def test_no_module_returns_a_view(name):
    """Every torchfast.nn module returns tensors of its own (FSDP2 warns about a view output: an
    in-place op on it would skip the pre-backward all-gather), with the values and gradients of the
    same call through torch's reshapes (impl="reference" path of the modules' ops)."""
    import torchfast

    torch.manual_seed(0)
    module, inputs = _module_cases()[name]
    out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    views = [i for i, o in enumerate(outs) if o._base is not None]
    assert not views, f"{name}: outputs {views} are views"
    with torchfast.use_impl("reference"):
        ref = module(*inputs)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    # An in-place op on the outputs, then backward: the gradients are those without it, or autograd
    # refuses loudly where backward needs the output itself (AddRMSNorm's h, saved by add_rms_norm).
    grads = torch.autograd.grad(sum(o.sum() for o in outs), [t for t in inputs if t.requires_grad])
    out2 = module(*inputs)
    outs2 = out2 if isinstance(out2, tuple) else (out2,)
    for o in outs2:
        o.add_(1.0)
    if name == "AddRMSNorm":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(sum(o.sum() for o in outs2), inputs)
        return
    grads2 = torch.autograd.grad(sum(o.sum() for o in outs2), [t for t in inputs if t.requires_grad])
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g, rtol=1e-6, atol=1e-7)


def test_shard_in_a_world_of_one_checks_and_returns_the_model(monkeypatch):
    """Without torchrun, shard() gives the model back unsharded, after the same checks."""
    from tests.train.tiny_lm import TinyLM
    from torchfast import distributed as tfdist

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    tfdist.cleanup()
    tfdist.init(device="cpu")
    try:
        model = TinyLM()
        assert tfdist.shard(model) is model
        model.layers[0].scale = torch.nn.Parameter(torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"parameter 'layers.0.scale' is a scalar \(0 dimensions\)"):
            tfdist.shard(model)
        with pytest.raises(ValueError, match="matched no submodule"):
            tfdist.shard(TinyLM(), blocks=torch.nn.Conv2d)
        with pytest.raises(TypeError, match="argument 'blocks' must be None"):
            tfdist.shard(TinyLM(), blocks="layers")
        tied = TinyLM()
        tied.lm_loss.weight = tied.embed_tokens.weight  # both in the root's group: allowed
        assert tfdist.shard(tied) is tied
    finally:
        tfdist.cleanup()


def test_linear_through_onednn_returns_no_view(monkeypatch):
    """The oneDNN GEMM path of torchfast.nn.Linear (float32 CPU, large enough; forced here, "auto" takes
    it on AMD CPUs) returns a tensor of its own for a 3-D input too, with F.linear's values."""
    import torchfast
    from torchfast.ops import linear as linear_ops

    monkeypatch.setenv("TORCHFAST_CPU_MATMUL", "onednn")
    lin = torchfast.nn.Linear(512, 512)
    x = torch.randn(4, 32, 512, requires_grad=True)
    assert linear_ops.eligible(x, lin.weight, lin.bias) == (linear_ops.cpu_matmul_backend() == "onednn")
    y = lin(x)
    assert y._base is None
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
