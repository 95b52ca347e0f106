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
from tests.train.common import CONFIGS, dataset, train  # noqa: E402
from torchfast import cli  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
t0 = time.perf_counter()
world = torchfast.distributed.init(expected_world_size=2)
assert world.backend == "gloo" and world.device.type == "cpu", world
for name, (per_rank_batch, accumulate) in CONFIGS.items():
    model = train(dataset(), per_rank_batch, accumulate)
    torch.save(model.state_dict(), out / f"{name}-rank{world.rank}.pt")
torchfast.distributed.barrier()
torchfast.distributed.print_main(
    f"DDP-OK world_size={world.world_size} ({time.perf_counter() - t0:.1f} s)", flush=True
)
code = cli.main(["demo", *sys.argv[2:]]) if len(sys.argv) > 2 else 0
torchfast.distributed.cleanup()
sys.exit(code)
