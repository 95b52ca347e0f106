"""The Trainer with strategy="fsdp" on two torchrun "nodes" of one process each, on this machine:

    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \\
        --rdzv-id=ID tests/train/trainer_fsdp_script.py OUT          (started twice: one per node)

Every run trains the model of tests/train/common.py for 3 epochs x 4 AdamW steps (per rank 8 batches
of 4 per epoch, accumulate 2: global steps of 16 samples, as in tests/train/test_trainer.py), its two
Linear layers FSDP2 groups by a user rule and the root holding the rest, with StepLR and gradient
clipping. Runs, in order (rank 0 writes OUT/<run>.pt: losses and the gathered final weights):
  parity          no dropout, a validation set: compared by the test with one process on the same
                  global batches (losses, validation losses, final weights)
  presharded      the same model sharded by the caller, then given to the Trainer with compile=
                  (aot_eager: each sharded block compiled in place) and detect_nonfinite=True
  mp-bf16         parity's run with fsdp_options={"mp_policy": bfloat16 compute, float32 reduction}
  reference       dropout 0.2 (so the RNG state matters), a sharded checkpoint every 3 steps
  more            right after it, in the same processes: resume=True for a 4th epoch
  crash13/resume13  crash in step 7 (last checkpoint: step 6, mid-epoch), then resume from a model
                  initialised from another seed
  reference-bf16  the same as reference under amp="bf16" (autocast)
  crash9/resume9  with amp="bf16": crash in step 5 (last checkpoint: step 4, an epoch end), then resume
Then bad input that must be refused on both ranks before any collective (OUT/errors.json), and each
rank's view of the launch (OUT/env-rank<r>.json). Not a test module: tests/train/test_trainer_fsdp.py
launches it and judges the results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torchfast  # noqa: E402
from tests.train.common import Crash, crashing_mse, dataset, make_model  # noqa: E402

PER_RANK, ACCUMULATE, EPOCHS = 4, 2, 3
torch.set_num_threads(1)
out = Path(sys.argv[1])
t0 = time.perf_counter()
# CPU processes over Gloo even where a GPU is visible (two ranks cannot share one GPU under NCCL)
world = torchfast.distributed.init(device="cpu", expected_world_size=2)
rank = world.rank
(out / f"env-rank{rank}.json").write_text(json.dumps(
    {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                                    "MASTER_ADDR", "TORCHELASTIC_RUN_ID")}))


def count_gradient_reductions() -> list[int]:
    """Counts FSDP2's gradient reductions (one call per group and reduction) by wrapping the function its
    parameter groups call, torch 2.13's private `_fsdp_param_group.foreach_reduce`: there is no public
    hook (DDP's comm hook has no FSDP2 counterpart). A torch that renames it fails here, loudly."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    calls = [0]
    real = _fsdp_param_group.foreach_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = counted
    return calls


reductions = count_gradient_reductions()


def linear_layers(name: str, module: nn.Module) -> bool:
    """The user's wrapping rule: every Linear (torchfast.nn.Linear is one) is its own FSDP2 group."""
    return isinstance(module, nn.Linear)


def run(name: str, *, crash_after: int | None = None, resume: bool = False, seed: int = 0,
        dropout: float = 0.2, presharded: bool = False, ckpt: str | None = None, amp: str = "off",
        val: bool = False, epochs: int = EPOCHS, fsdp_options: dict | None = None) -> None:
    model = make_model(seed=seed, dropout=dropout)
    if presharded:
        model = torchfast.distributed.shard(model, blocks=linear_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    trainer = torchfast.Trainer(
        model, opt, crashing_mse(crash_after), amp=amp, accumulate=ACCUMULATE, grad_clip=1.0,
        checkpoint_dir=out / "ckpt" / (ckpt or name),
        checkpoint_every=3, scheduler=sched, progress=None, strategy="fsdp",
        blocks=None if presharded else linear_layers, fsdp_options=fsdp_options,
        compile={"backend": "aot_eager"} if presharded else False, detect_nonfinite=presharded,
    )
    loader = torchfast.distributed.data_loader(dataset(), PER_RANK, shuffle=True, num_workers=0)
    reductions[0] = 0
    try:
        val_data = dataset(seed=5) if val else None
        result = trainer.fit(loader, epochs, val_data, batch_size=PER_RANK, resume=resume)
    except Crash:
        # every rank crashes at the same loss call, before the backward's reduce-scatter: none waits
        dist.barrier()
        if rank == 0:
            latest = trainer.checkpoint_path
            torch.save({"crashed_after": trainer.step, "latest": latest.name,
                        "files": sorted(p.name for p in latest.iterdir())}, out / f"{name}.pt")
        return
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}  # a collective: every rank
    reduced = reductions[0]
    reductions[0] = 0
    checkpoints = [None, None]  # what each rank reports as the newest checkpoint
    dist.all_gather_object(checkpoints, result.checkpoint)
    if rank == 0:
        torch.save({
            "losses": result.losses, "val_losses": result.val_losses, "steps": result.steps,
            "gradient_reductions": reduced, "checkpoints": checkpoints,
            "resumed_from": result.resumed_from,
            "weights": weights,
            "fsdp_modules": sorted(n or "<root>" for n, m in model.named_modules()
                                   if isinstance(m, FSDPModule)),
            "local_shapes": {n: list(p.to_local().shape) for n, p in model.named_parameters()
                             if isinstance(p, DTensor)},
            "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "compiled_blocks": sorted(n for n, m in model.named_modules() if hasattr(m, "_compiled_call_impl")
                                      and m._compiled_call_impl is not None),
            "optimizer_holds_model_params": {id(p) for g in opt.param_groups for p in g["params"]}
            == {id(p) for p in model.parameters()},
        }, out / f"{name}.pt")


def errors() -> dict:
    """Each call must raise on both ranks, naming the module, before any collective: the barrier after
    each would hang otherwise (the test's timeout then fails it)."""
    from torch.nn.parallel import DistributedDataParallel

    messages = {}

    def expect(key, make):
        try:
            make()
            messages[key] = "no error"
        except (ValueError, TypeError) as e:
            messages[key] = f"{type(e).__name__}: {e}"
        dist.barrier()

    def trainer(model, **kwargs):
        return torchfast.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss,
                                 progress=None, **kwargs)

    expect("ddp-model-fsdp-strategy", lambda: trainer(DistributedDataParallel(make_model()), strategy="fsdp"))
    inner = make_model()
    inner[2] = DistributedDataParallel(inner[2])
    expect("ddp-inside-fsdp-strategy", lambda: trainer(inner, strategy="fsdp"))
    expect("sharded-model-ddp-strategy",
           lambda: trainer(torchfast.distributed.shard(make_model(), blocks=linear_layers)))
    expect("sharded-model-with-blocks",
           lambda: trainer(torchfast.distributed.shard(make_model()), strategy="fsdp", blocks=nn.Linear))
    expect("fp16-fsdp", lambda: trainer(make_model(), strategy="fsdp", amp="fp16"))
    stepped = make_model()
    opt = torch.optim.AdamW(stepped.parameters(), lr=1e-2)
    stepped(torch.randn(2, 8)).sum().backward()
    opt.step()
    expect("optimizer-with-state", lambda: torchfast.Trainer(stepped, opt, nn.functional.mse_loss,
                                                              progress=None, strategy="fsdp"))
    return messages


run("parity", dropout=0.0, val=True)
run("presharded", dropout=0.0, presharded=True)
run("mp-bf16", dropout=0.0, fsdp_options={"mp_policy": MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)})
for crash, amp in ((13, "off"), (9, "bf16")):
    torch.manual_seed(123)
    run("reference" if amp == "off" else f"reference-{amp}", amp=amp)
    if amp == "off":
        # straight on, in the same processes (as docs/distributed.md's example): resume from the
        # checkpoint the run above has just published, for one more epoch
        run("more", resume=True, seed=99, ckpt="reference", epochs=EPOCHS + 1)
    torch.manual_seed(7)  # a different global RNG state: the checkpoint must restore it
    run(f"crash{crash}", crash_after=crash, ckpt=f"crash{crash}", amp=amp)
    run(f"resume{crash}", resume=True, seed=99, ckpt=f"crash{crash}", amp=amp)
messages = errors()
if rank == 0:
    (out / "errors.json").write_text(json.dumps(messages, indent=1))
dist.barrier()
torchfast.distributed.print_main(f"TRAINER-FSDP-OK world_size={world.world_size} "
                                 f"({time.perf_counter() - t0:.1f} s)", flush=True)
torchfast.distributed.cleanup()
