"""FSDP2 (`fully_shard`, through torchfast.distributed.shard) over models of torchfast modules: two CPU
processes under torchrun (Gloo) against one process in float32, per configuration of
tests/train/fsdp_script.py (which says what each one is), and the errors of bad input.

One torchrun launch runs every default configuration (a launch costs seconds of imports); the
torch.compile configuration has its own launch, marked slow (inductor builds C++ for ~20 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.test_distributed import ROOT, explain, torchrun

DEFAULT = ["per-block", "no-reshard", "bf16", "offload", "checkpoint", "optimize", "raw"]
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
    return _launch(tmp_path_factory, [*DEFAULT, "errors", "view-control"], timeout=240)


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
    assert r["warnings"] == [], f"{name}: FSDP2 warned that a torchfast module returned a view: {r['warnings']}"


@pytest.mark.parametrize("name", DEFAULT)
def test_two_processes_match_one_process(results: dict, name: str):
    """Losses, gathered gradients of every step and final weights of 3 AdamW steps under FSDP2 equal
    one float32 process within float32 rounding; no torchfast module output trips FSDP2's view warning."""
    _check_parity(name, results[name])


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
    assert "'layers.2.side.2.weight' (group 'layers.2')" in m["shared-between-blocks"], m
    assert "'layers.0.self_attn.o_proj.weight' (group 'layers.0')" in m["shared-between-blocks"], m


def test_view_warning_control(results: dict):
    """The positive control of the no-view checks: torch's own nn.Linear (bias, 3-D input) returns a
    view, and FSDP2 warns about it in the same worker."""
    assert any("returned a view tensor" in w for w in results["view-control"]["warnings"]), results


@pytest.mark.slow
def test_two_processes_match_one_process_compiled(tmp_path_factory):
    """The blocks compiled with torch.compile after sharding (inductor on CPU): same parity, one graph
    per block (3) and no graph break: FSDP2's hooks and the torchfast ops trace."""
    r = _launch(tmp_path_factory, ["compile"], timeout=600)["compile"]
    _check_parity("compile", r)
    assert r["graph_breaks"] == {} and r["frames"] == 3, r
