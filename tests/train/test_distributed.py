"""torchfast.distributed: torchrun on CPU (Gloo) against a single process, and its errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchfast
from tests.train.common import CONFIGS, dataset, make_model, train
from torchfast import distributed as tfdist

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str, cwd: Path, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=nproc ARGS` with one thread per
    process and this checkout importable."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return (
        f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )


@pytest.fixture(autouse=True)
def _fresh_world():
    tfdist.cleanup()
    yield
    tfdist.cleanup()


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One torchrun launch, 2 CPU processes: the DDP trainings of CONFIGS, then `torchfast demo`."""
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(
        str(ROOT / "tests" / "train" / "ddp_script.py"),
        str(out),
        "--steps",
        "60",
        "--out",
        str(out / "demo"),
        cwd=out,
    )
    assert proc.returncode == 0 and "DDP-OK world_size=2" in proc.stdout, explain(proc)
    return out, proc


@pytest.fixture(scope="module")
def ddp_weights(torchrun_run) -> Path:
    out, proc = torchrun_run
    assert proc.stdout.count("DDP-OK") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torchrun_two_processes_match_one_process(ddp_weights: Path, config: str):
    """2 processes x per-rank batch B (x accumulate) == 1 process x batch 2B over the same global
    batches: DistributedSampler gives rank r the positions r, r+2, ... of the epoch's permutation, so
    a global batch of the 2-process run holds the same samples as the 1-process batch."""
    torch.set_num_threads(1)
    rank0 = torch.load(ddp_weights / f"{config}-rank0.pt")
    rank1 = torch.load(ddp_weights / f"{config}-rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{config}: {name} differs between the ranks"
    per_rank, accumulate = CONFIGS[config]
    single = train(dataset(), 2 * per_rank, accumulate).state_dict()
    for name in rank0:
        torch.testing.assert_close(
            rank0[name],
            single[name],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, n=name: f"{config}: {n}: DDP vs one process: {m}",
        )
    # and the run moved the weights at all (the comparison is not between two untrained models)
    untrained = make_model().state_dict()
    assert (rank0["0.weight"] - untrained["0.weight"]).abs().max() > 1e-2


def test_accumulation_equals_one_large_batch():
    """In one process: 2 micro-batches of 8 per step == one batch of 16 (mean losses, equal sizes)."""
    torch.set_num_threads(1)
    big = train(dataset(), 16, 1).state_dict()
    accumulated = train(dataset(), 8, 2).state_dict()
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-5)


def test_without_torchrun_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    w = tfdist.init(device="cpu")
    assert (w.rank, w.world_size, w.backend, w.is_main) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert tfdist.wrap(model) is model  # no DDP for one process
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(tfdist.all_reduce_mean(t), t)
    tfdist.barrier()
    loader = tfdist.data_loader(dataset(), 16, num_workers=0)
    assert len(loader) == 4 and isinstance(loader.sampler, torch.utils.data.DistributedSampler)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "WORLD_SIZE=3 processes but world_size=2"),
    ],
    ids=["partial", "rank-out-of-range", "not-an-int", "world-size-mismatch"],
)
def test_bad_torchrun_environment(monkeypatch, env, match):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match=match):
        tfdist.init(device="cpu", expected_world_size=2)
    assert not torch.distributed.is_initialized()


def test_trainer_world_size_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="world_size=2 was expected, but this process was not launched"):
        torchfast.Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss, world_size=2
        )


def test_data_loader_bad_input():
    with pytest.raises(ValueError, match="data_loader: the dataset is empty"):
        tfdist.data_loader(torch.utils.data.TensorDataset(torch.zeros(0, 2)), 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tfdist.data_loader(dataset(), 0)


def test_demo_under_torchrun(torchrun_run):
    """`torchfast demo` in 2 torchrun processes on CPU (as `torchrun --standalone --nproc_per_node=2 -m
    torchfast demo`, launched together with the DDP trainings): rank 0 alone reports and exports."""
    out, proc = torchrun_run
    assert proc.stdout.count("torchfast demo: OK") == 1, explain(proc)
    assert proc.stdout.count("torchfast demo: training") == 1, proc.stdout
    assert re.search(
        r"^\s+train\s+60 steps.*2 processes \(DDP, batch 128 each\)", proc.stdout, re.MULTILINE
    ), proc.stdout
    start, end = map(float, re.search(r"loss\s+start ([\d.]+) -> end ([\d.]+)", proc.stdout).groups())
    assert end < 0.5 * start
    assert (out / "demo" / "torchfast_demo_mlp.onnx").is_file()
    assert list((out / "demo" / "tensorboard").glob("events.out.tfevents.*"))
    assert re.search(r"train: 100%.*60/60", proc.stderr), proc.stderr[-2000:]
