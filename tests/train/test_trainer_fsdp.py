"""Trainer(strategy="fsdp") on two torchrun "nodes" of one CPU process each (Gloo), on localhost: one
launch of tests/train/trainer_fsdp_script.py (which says what each run does), judged here against one
process; the exact resume after a crash from a sharded torch.distributed.checkpoint checkpoint; and
DDP/FSDP mixing refused by name on both ranks. The one-process counterparts (the DCP checkpoint
format, atomic writes, bad arguments) are in tests/train/test_trainer.py.

One launch costs about 15 s of imports and rendezvous plus 15 s of training here; a rendezvous that
never completes fails the test after LAUNCH_TIMEOUT instead of hanging it (both agents are killed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.common import crashing_mse, dataset, make_model
from tests.train.test_distributed import ROOT
from torchfast import Trainer
from torchfast import distributed as tfdist

SCRIPT = ROOT / "tests" / "train" / "trainer_fsdp_script.py"
LAUNCH_TIMEOUT = 240
# Float32 rounding: the two ranks sum their halves of each micro-batch and the reduce-scatter adds the
# halves, where one process sums the whole micro-batch in one order. Measured over the 12 AdamW steps:
# losses within 1.0e-7 (relative), final weights within 1.5e-7 of each tensor's largest element.
# A missing shard, a gradient summed instead of averaged or a micro-batch reduced twice is an error of
# order 1e-2 or more (the weights moved by 7e-2).
LOSS_TOL, WEIGHT_TOL = 1e-6, 2e-6


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_command(port: int, run_id: str, *args: str) -> list[str]:
    """The command each "node" runs (docs/distributed.md shows it): torchrun with the c10d rendezvous
    at 127.0.0.1:port, 2 nodes of 1 process. join_timeout bounds the wait for the other node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            "--rdzv-conf=join_timeout=60", "--max-restarts=0", *args]


def launch_two_nodes(out: Path, timeout: int = LAUNCH_TIMEOUT) -> list[str]:
    """Start both nodes, wait for both, and return their logs. Each agent runs in its own session, so
    that on a timeout the agent and its worker are killed together (a hung rendezvous or collective
    fails the test instead of hanging the suite)."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = two_node_command(free_port(), f"torchfast-test-{os.getpid()}", str(SCRIPT), str(out))
    procs = []
    for node in range(2):
        log = open(out / f"node{node}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        procs.append((subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        for _, log in procs:
            log.close()
    logs = [(out / f"node{n}.log").read_text() for n in range(2)]
    codes = [p.returncode for p, _ in procs]
    assert codes == [0, 0] and any("TRAINER-FSDP-OK world_size=2" in t for t in logs), (
        f"two-node launch failed or timed out after {timeout} s (exit codes {codes}):\n"
        + "\n".join(f"--- node {n} (tail) ---\n{t[-4000:]}" for n, t in enumerate(logs)))
    return logs


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-nodes")
    launch_two_nodes(out)
    return out


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


def test_two_nodes_of_one_process(out: Path):
    """torchrun made one world of 2 from two agents: global ranks 0 and 1, each local rank 0 of a node
    of 1 (GROUP_RANK is the node's rank, given by the c10d rendezvous)."""
    env = [json.loads((out / f"env-rank{r}.json").read_text()) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["WORLD_SIZE"]) for e in env] == [
        ("0", "0", "1", "2"), ("1", "0", "1", "2")]
    assert sorted(e["GROUP_RANK"] for e in env) == ["0", "1"]


def test_fsdp_on_two_nodes_matches_one_process(out: Path):
    """12 AdamW steps (accumulation, clipping, StepLR) sharded over 2 nodes: the losses, the validation
    loss after each epoch (Trainer.evaluate: sharded forward only) and the gathered final weights equal
    one process's on the same global batches within float32 rounding. Clipping to 1.0 is active in
    the first 6 steps (norms 3.0 down to 1.3), so a norm of this rank's shards alone would show."""
    tfdist.cleanup()
    torch.set_num_threads(1)
    model = make_model(dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model, opt, crashing_mse(None), amp="off", accumulate=2, grad_clip=1.0,
                      scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
                      progress=None, device="cpu")
    loader = tfdist.data_loader(dataset(), 8, shuffle=True, num_workers=0)
    result = trainer.fit(loader, 3, dataset(seed=5), batch_size=8)
    tfdist.cleanup()
    got = load(out, "parity")
    assert got["steps"] == result.steps == 12
    for step, (a, b) in enumerate(zip(got["losses"], result.losses)):
        assert abs(a - b) <= LOSS_TOL * abs(b), f"step {step + 1}: loss {a} on 2 nodes, {b} in one process"
    assert len(got["val_losses"]) == len(result.val_losses) == 3
    for epoch, (a, b) in enumerate(zip(got["val_losses"], result.val_losses)):
        assert abs(a - b) <= LOSS_TOL * abs(b), f"epoch {epoch + 1}: validation loss {a} vs {b}"
    want = dict(model.named_parameters())
    for name, w in got["weights"].items():
        err = ((w - want[name]).abs().max() / want[name].abs().max()).item()
        assert err <= WEIGHT_TOL, f"{name}: 2 nodes vs one process, relative error {err:.2e}"
    assert (want["0.weight"] - make_model()[0].weight).abs().max() > 1e-2  # training moved the weights


def test_mixed_precision_policy_through_the_trainer(out: Path):
    """fsdp_options={"mp_policy": MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)}
    reaches fully_shard: the sharded master weights stay float32, and the run follows the float32 one
    as bfloat16 compute allows (8 bits of mantissa: measured within 2.8e-3 relative per loss and
    1.6e-3 of each weight tensor's largest element over the 12 steps), without matching it to float32
    rounding (1e-7: that would mean bfloat16 was not used)."""
    mp, fp32 = load(out, "mp-bf16"), load(out, "parity")
    assert mp["param_dtypes"] == ["torch.float32"] and mp["all_dtensor"]
    errs = [abs(a - b) / abs(b) for a, b in zip(mp["losses"], fp32["losses"])]
    assert max(errs) <= 1e-2, errs
    assert max(errs) > 1e-4, f"bfloat16 compute should show in the losses: {errs}"
    for name, w in fp32["weights"].items():
        err = ((mp["weights"][name] - w).abs().max() / w.abs().max()).item()
        assert err <= 1e-2, f"{name}: bf16 vs float32 weights, relative error {err:.2e}"


def test_the_model_was_sharded_by_the_users_rule(out: Path):
    """blocks=<rule selecting the Linear layers>: groups '0' and '2' plus the root (holding RMSNorm);
    every parameter is a DTensor holding half of dimension 0; the optimizer steps those parameters."""
    got = load(out, "parity")
    assert got["fsdp_modules"] == ["0", "2", "<root>"] and got["all_dtensor"]
    assert got["local_shapes"] == {"0.weight": [16, 8], "0.bias": [16], "1.weight": [16], "2.weight": [2, 32],
                                   "2.bias": [2]}
    assert got["optimizer_holds_model_params"]


def test_gradients_are_reduced_once_per_step(out: Path):
    """accumulate=2: the first micro-batch's backward runs with FSDP2's gradient sync off, so each of
    the 3 groups reduce-scatters once per optimizer step (12 steps: 36), not once per micro-batch (72)."""
    assert load(out, "parity")["gradient_reductions"] == 12 * 3


def test_a_model_sharded_by_the_caller_and_compiled_trains_the_same(out: Path):
    """shard() by the caller, then Trainer(strategy="fsdp", compile={"backend": "aot_eager"},
    detect_nonfinite=True): the Trainer compiles the two sharded blocks in place, and the losses are
    bit-for-bit those of the eager parity run (aot_eager runs the same aten kernels; the detector's
    hooks only read)."""
    got = load(out, "presharded")
    assert got["compiled_blocks"] == ["0", "2"], got["compiled_blocks"]
    assert got["losses"] == load(out, "parity")["losses"]


@pytest.mark.parametrize("crash, reference", [(13, "reference"), (9, "reference-bf16")],
                         ids=["mid-epoch-checkpoint", "epoch-end-checkpoint-bf16"])
def test_sharded_resume_after_a_crash_is_exact(out: Path, crash: int, reference: str):
    """Crash in step 7 (last sharded checkpoint: step 6, mid-epoch) or, under bf16 autocast, in step 5
    (step 4, an epoch end) on both nodes, then resume with a model initialised from another seed: every
    loss and every gathered weight is bit-for-bit the uninterrupted run's. Bit-equal, not merely close:
    each rank reloads its own shards of the weights and of AdamW's moments, its RNG state and the
    position in the epoch, and the same two ranks then run the same kernels and the same Gloo
    collectives in the same order."""
    crashed, resumed = load(out, f"crash{crash}"), load(out, f"resume{crash}")
    reference = load(out, reference)
    step = 6 if crash == 13 else 4
    assert crashed["crashed_after"] == step and crashed["latest"] == f"step-{step:08d}"
    # each rank wrote its own shards: one file per rank, DCP's metadata, and rank 0's trainer state
    assert crashed["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]
    assert resumed["resumed_from"].endswith(f"step-{step:08d}")
    assert resumed["steps"] == reference["steps"] == 12
    assert resumed["losses"] == reference["losses"]
    for name, w in reference["weights"].items():
        assert torch.equal(resumed["weights"][name], w), f"{name} differs after resume"
    assert not torch.equal(reference["weights"]["0.weight"], make_model()[0].weight)


def test_resume_straight_after_a_run_sees_its_last_checkpoint(out: Path):
    """fit(resume=True) right after fit() in the same processes continues from the checkpoint just
    written, on both ranks: rank 0 publishes it (rewrites `latest`) before any rank returns from the
    write. Without that, rank 1 read the previous `latest`, whose folder rank 0 had already removed,
    and failed with FileNotFoundError (seen with docs/distributed.md's example under torchrun)."""
    reference, more = load(out, "reference"), load(out, "more")
    assert reference["checkpoints"][0] == reference["checkpoints"][1]
    assert reference["checkpoints"][0].endswith("step-00000012")
    assert more["resumed_from"] == reference["checkpoints"][0]
    assert more["steps"] == 16 and more["losses"][:12] == reference["losses"]
    assert more["checkpoints"][0] == more["checkpoints"][1]
    assert more["checkpoints"][0].endswith("step-00000016")


def test_mixing_ddp_and_fsdp_is_refused_by_name_on_both_ranks(out: Path):
    """Each call raised on both ranks before any collective (the worker's barrier after each would have
    hung otherwise), naming the module."""
    m = json.loads((out / "errors.json").read_text())
    assert m["ddp-model-fsdp-strategy"].startswith(
        "ValueError: torchfast.Trainer: module '<root>' of the model is a DistributedDataParallel, but "
        "strategy='fsdp'"), m
    assert "module '2' of the model is a DistributedDataParallel" in m["ddp-inside-fsdp-strategy"], m
    assert "module '<root>' of the model is sharded with FSDP2 (fully_shard), but strategy='ddp'" in m[
        "sharded-model-ddp-strategy"], m
    assert "sharded already (fully_shard), so blocks= and fsdp_options= cannot apply" in m[
        "sharded-model-with-blocks"], m
    assert "amp='fp16' means float16 with a GradScaler" in m["fp16-fsdp"], m
    assert "this optimizer already holds state" in m["optimizer-with-state"], m
