"""Run under `torchrun --standalone --nproc_per_node=2 tests/train/ddp_script.py OUT [demo args]`:

1. trains the model of tests/train/common.py with the Trainer (DDP over Gloo on CPU) in each
   configuration of CONFIGS and saves every rank's final weights to OUT/<config>-rank<r>.pt;
2. then runs `torchfast demo` with the remaining arguments in the same processes (one torchrun launch
   for both keeps the test suite fast; the demo joins the process group that is already set up).

Not a test module itself: tests/train/test_distributed.py launches it.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torchfast  # noqa: E402
from tests.train.common import CONFIGS, dataset, make_model, train  # noqa: E402
from torchfast import cli  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
t0 = time.perf_counter()
world = torchfast.distributed.init(expected_world_size=2)
assert world.backend == "gloo" and world.device.type == "cpu", world


def count_allreduces(trainer, calls):
    """A DDP communication hook that counts the gradient all-reduces (one bucket: a tiny model)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)

    trainer.model.register_comm_hook(None, hook)


for name, (per_rank_batch, accumulate) in CONFIGS.items():
    calls = []
    model = train(dataset(), per_rank_batch, accumulate, on_trainer=lambda t: count_allreduces(t, calls))
    torch.save(model.state_dict(), out / f"{name}-rank{world.rank}.pt")
    # One all-reduce per optimizer step, not per micro-batch: no_sync() covers all but the last one.
    steps = 2 * 64 // (2 * per_rank_batch * accumulate)
    assert calls == [0] * steps, f"{name}: {len(calls)} all-reduces for {steps} optimizer steps"
# Errors that only a real multi-process world can raise.
try:
    torchfast.distributed.init(expected_world_size=3)
    raise AssertionError("init(expected_world_size=3) accepted a world of 2")
except RuntimeError as e:
    assert "the world has 2 processes but world_size=3 was expected" in str(e), e
model = make_model()
trainer = torchfast.Trainer(
    model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss, progress=None
)
try:
    trainer.fit(torch.utils.data.DataLoader(dataset(), batch_size=8), 1)
    raise AssertionError("a DataLoader without DistributedSampler was accepted under DDP")
except ValueError as e:
    assert "without a DistributedSampler" in str(e), e
torchfast.distributed.barrier()
torchfast.distributed.print_main(
    f"DDP-OK world_size={world.world_size} ({time.perf_counter() - t0:.1f} s)", flush=True
)
# Nothing of the trainings above may keep a DDP wrapper (and through it the process group) alive until
# interpreter finalization: see torchfast.distributed._exit_cleanup.
del trainer, model
code = cli.main(["demo", *sys.argv[2:]]) if len(sys.argv) > 2 else 0
torchfast.distributed.cleanup()
sys.exit(code)
