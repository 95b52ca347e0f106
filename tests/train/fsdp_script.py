"""Run under `torchrun --standalone --nproc_per_node=2 tests/train/fsdp_script.py OUT CONFIG[,CONFIG...]`.

For each configuration, FSDP2 (`fully_shard`, per block and at the root, over Gloo on CPU) trains a
model of torchfast modules for STEPS AdamW steps, each rank on its half of every global batch, and one
process trains a copy in float32 on the whole batch (in each rank, no collectives). Rank 0 writes
OUT/results.json with, per configuration: the relative errors (max |a - b| / max |b|) of the global loss,
of every gathered gradient (`DTensor.full_tensor()`) and of the final parameters against one process,
the warnings FSDP2 raised, and how the sharded weights were split. Not a test module:
tests/train/test_fsdp.py launches it and judges the numbers.

Configurations (tests/train/test_fsdp.py and docs/distributed.md name them):
  per-block     TinyLM, fused LinearCrossEntropyLoss head, reshard_after_forward=True
  no-reshard    TinyLM, plain Linear + CrossEntropyLoss head, reshard_after_forward=False
  bf16          MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), against one process
                that replays it (bf16 copies of the float32 weights, one backward per rank's half,
                gradients averaged in float32)
  offload       CPUOffloadPolicy(pin_memory=False)
  checkpoint    every block under non-reentrant torch.utils.checkpoint, reshard_after_forward=True
  optimize      torchfast.optimize of the plain-PyTorch Llama stack of tests/dropin/models.py
  compile       blocks compiled with torch.compile after sharding (slow: inductor builds C++)
  compile-aot   the same with backend="aot_eager": dynamo + AOTAutograd graphs, no code generation
  raw           torch's fully_shard called directly (per block, then the root)
  errors        bad input refused by torchfast.distributed.shard / wrap on both ranks, by name
  view-control  torch's own nn.Linear (bias, 3-D input) as a sharded module: FSDP2 must warn that it
                returned a view (the positive control for the no-warning checks)
  hf            a tiny random transformers Llama (3 decoder layers, tied embeddings) after
                torchfast.transformers.patch, trained with labels (the fused linear_cross_entropy loss),
                each decoder layer and the root sharded; needs transformers
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torchfast  # noqa: E402
from tests.dropin.models import LlamaStack  # noqa: E402
from tests.train.tiny_lm import HIDDEN, SEQ, TinyLM, batches  # noqa: E402

STEPS, GLOBAL_BATCH = 3, 4
torch.set_num_threads(1)
out = Path(sys.argv[1])
configs = sys.argv[2].split(",")
world = torchfast.distributed.init(expected_world_size=2)
rank, half = world.rank, GLOBAL_BATCH // 2
mesh = init_device_mesh("cpu", (2,))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Case:
    """What a configuration trains: the model, its loss on a batch, the data, the blocks to shard."""

    def __init__(self, name: str):
        self.name = name
        torch.manual_seed(0)
        if name == "hf":
            import transformers

            config = transformers.LlamaConfig(
                hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=67, max_position_embeddings=64, tie_word_embeddings=True)
            self.model = transformers.LlamaForCausalLM(config)
            report = torchfast.transformers.patch(self.model)
            self.patched = sorted({r.part for r in report.replaced})
            g = torch.Generator().manual_seed(1)
            self.data = [(torch.randint(0, 67, (GLOBAL_BATCH, SEQ), generator=g),) for _ in range(STEPS)]
        elif name == "optimize":
            self.model, _ = torchfast.optimize(LlamaStack(layers=2, hidden_size=HIDDEN, intermediate_size=64),
                                               verify=False)
            g = torch.Generator().manual_seed(1)
            self.data = [(torch.randn(GLOBAL_BATCH, SEQ, HIDDEN, generator=g),
                          torch.randn(GLOBAL_BATCH, SEQ, HIDDEN, generator=g)) for _ in range(STEPS)]
        else:
            self.model = TinyLM(head="plain" if name == "no-reshard" else "fused")
            self.data = [(b,) for b in batches(STEPS, GLOBAL_BATCH)]

    def loss(self, model: torch.nn.Module, batch: tuple, rows: slice) -> torch.Tensor:
        if self.name == "optimize":
            x, y = batch
            return F.mse_loss(model(x[rows]).float(), y[rows])
        if self.name == "hf":
            ids = batch[0][rows]
            out = model(input_ids=ids, labels=ids)
            assert out.logits is None or not model.training, "the patched loss built the logits"
            return out.loss.float()
        return model(batch[0][rows]).float()

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(model.model.layers) if self.name == "hf" else list(model.layers)


def reference_step(case: Case, ref, opt, batch, bf16: bool):
    """One process: the loss and gradients of the whole global batch, then the AdamW step. With bf16
    it replays FSDP2's mixed precision: each rank's half through a bfloat16 copy of the float32
    weights, gradients cast to float32 and averaged over the halves."""
    opt.zero_grad(set_to_none=True)
    if not bf16:
        loss = case.loss(ref, batch, slice(None))
        loss.backward()
        loss = loss.item()
    else:
        losses, grads = [], None
        for r in range(2):
            low = copy.deepcopy(ref).to(torch.bfloat16)
            l_r = case.loss(low, batch, slice(r * half, (r + 1) * half))
            l_r.backward()
            losses.append(l_r.item())
            g_r = [p.grad.float() for p in low.parameters()]
            grads = g_r if grads is None else [a + b for a, b in zip(grads, g_r)]
        for p, g in zip(ref.parameters(), grads):
            p.grad = g / 2
        loss = sum(losses) / 2
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    opt.step()
    return loss, grads


def run(name: str) -> dict:
    case = Case(name)
    model = case.model
    ref = copy.deepcopy(model)
    result: dict = {"loss_err": [], "grad_err": [], "losses": [], "warnings": []}
    if name == "checkpoint":
        for block in case.blocks(model):
            block.checkpointed = True
    if name == "raw":  # torch's own calls, per block then the root, as torchfast.distributed.shard makes them
        for block in case.blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        mp = None
        if name == "bf16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        torchfast.distributed.shard(model, reshard_after_forward=name != "no-reshard", mp_policy=mp,
                                    offload=name == "offload")
    result["fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in model.modules())
    if name == "hf":
        result["patched"] = case.patched
    if name in ("compile", "compile-aot"):
        # in place: parameter names stay those of the reference. aot_eager traces the same graphs
        # (dynamo and AOTAutograd, FSDP2's hooks, the torchfast ops) without inductor's C++ build.
        backend = "aot_eager" if name == "compile-aot" else "inductor"
        for block in case.blocks(model):
            block.compile(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    result["shards"] = {n: [list(p.to_local().shape), list(p.shape)] for n, p in model.named_parameters()
                        if n.endswith("lm_loss.weight") or n.endswith("lm_head.weight")}
    result["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in case.data:
            want_loss, want_grads = reference_step(case, ref, opt_ref, batch, bf16=name == "bf16")
            opt.zero_grad(set_to_none=True)
            loss = case.loss(model, batch, slice(rank * half, (rank + 1) * half))
            loss.backward()
            got_loss = torchfast.distributed.all_reduce_mean(loss.detach().double()).item()
            result["losses"].append([got_loss, want_loss])
            result["loss_err"].append(abs(got_loss - want_loss) / abs(want_loss))
            errs = {n: rel_err(full(p.grad), want_grads[n]) for n, p in model.named_parameters()}
            result["grad_err"].append(errs)
            opt.step()
    want = dict(ref.named_parameters())
    result["param_err"] = {n: rel_err(full(p), want[n]) for n, p in model.named_parameters()}
    # how far training moved the weights (the comparison is not between two untrained models)
    result["moved"] = max((full(p) - q).abs().max().item() for p, q in
                          zip(model.parameters(), Case(name).model.parameters()))
    if name in ("compile", "compile-aot"):
        from torch._dynamo.utils import counters

        result["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
        result["frames"] = counters["stats"]["unique_graphs"]
    result["warnings"] = sorted({str(w.message)[:200] for w in caught if "view tensor" in str(w.message)})
    return result


def view_control() -> dict:
    """torch's nn.Linear with a bias on a 3-D input returns a view (of its 2-D addmm result): sharded on
    its own, FSDP2 warns. Shows that the no-warning checks above can fail."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(HIDDEN, HIDDEN)
    fully_shard(lin, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lin(torch.randn(2, SEQ, HIDDEN, requires_grad=True)).sum().backward()
    return {"warnings": sorted({str(w.message)[:200] for w in caught if "view tensor" in str(w.message)})}


def errors() -> dict:
    """Bad input that a real 2-process world raises: each call must fail on both ranks with a message,
    before any collective (the barrier after it would hang otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    messages = {}

    def expect(key, fn):
        try:
            fn()
            messages[key] = "no error"
        except (ValueError, TypeError) as e:
            messages[key] = f"{type(e).__name__}: {e}"

    mixed = TinyLM()
    mixed.layers[1] = DistributedDataParallel(mixed.layers[1])
    expect("ddp-inside", lambda: torchfast.distributed.shard(mixed))
    sharded = torchfast.distributed.shard(TinyLM())
    expect("ddp-over-fsdp", lambda: torchfast.distributed.wrap(sharded))
    expect("twice", lambda: torchfast.distributed.shard(sharded))
    expect("trainer", lambda: torchfast.Trainer(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1),
                                                F.mse_loss, progress=None))
    tied = TinyLM()
    tied.layers[2].side[2].weight = tied.layers[0].self_attn.o_proj.weight
    expect("shared-between-blocks", lambda: torchfast.distributed.shard(tied))
    return {"messages": messages}


results: dict = {}
for name in configs:
    t0 = time.perf_counter()
    try:
        special = {"view-control": view_control, "errors": errors}
        results[name] = special[name]() if name in special else run(name)
        results[name]["status"] = "ok"
    except Exception as e:  # recorded, so the test reports what torch said for this configuration
        results[name] = {"status": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    dist.barrier()
if rank == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = " ".join(f"{k}:{v['status'][:40]}({v['seconds']}s)" for k, v in results.items())
    print("FSDP-OK", summary, flush=True)
torchfast.distributed.cleanup()
