"""DDP against FSDP2 (and FSDP2 + activation checkpointing) and tensor parallelism on CPU: per-process
peak memory and step time of one Llama-style language model of torchfast modules, 2 processes over Gloo.

    python benchmarks/bench_distributed.py                 # hidden 512, 8 layers, vocab 16000 (42M params)
    python benchmarks/bench_distributed.py --quick         # a small model: a smoke run
    python benchmarks/bench_distributed.py --hidden 768 --layers 12 --nproc 2 --steps 5

Each engine runs in its own `torchrun` launch (fresh processes: a peak can be measured once per
process), one after the other in this run, on the same model, data and seed. Per rank: the growth of
peak RSS (VmHWM, reset through /proc/self/clear_refs once torch is imported, the process group is up
and a small model went through the same engine) over building, wrapping and training the model, and
the median wall time of a training step (forward, backward, AdamW) after one warm-up step. glibc's
mmap threshold is set to 64 KB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave RSS: with its
default, freed blocks of a few MB stay in the heap, and the peak of a sharded model read like that of
an unsharded one. The table reports rank 0 (peak: the larger of the ranks) and the loss of the last
step, which must agree between engines (same batches, same initial weights). Expected memory of
weights + gradients + AdamW state: 16 bytes per parameter under DDP (plus its gradient buckets, 4
more), 16/N under FSDP2, plus activations and, for FSDP2, the gathered weights of a block.

"tp" is tensor parallelism with sequence parallelism (`tp_plan` below, applied by
torchfast.distributed.parallelize): the attention and MLP projections and the embedding split over the
N ranks, the norms and the fused LM head's classifier replicated, every rank working on the same
global batch (batch x N sequences, as the data-parallel engines share between them) with the tokens
sharded between the norms. Its weights, gradients and AdamW state are 16 bytes per parameter of the
replicated layers plus 16/N of the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp", "fsdp-no-reshard", "fsdp-checkpoint", "tp")


def _load_tiny_lm():
    spec = importlib.util.spec_from_file_location("_tf_tiny_lm", ROOT / "tests" / "train" / "tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(args: argparse.Namespace) -> None:
    """One engine, inside torchrun: writes this rank's numbers to OUT/<engine>-rank<r>.json."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import torchfast

    torch.set_num_threads(args.threads)
    world = torchfast.distributed.init()
    tiny = _load_tiny_lm()

    class LM(nn.Module):
        def __init__(self, hidden, layers, heads, inter, vocab):
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(tiny.Block("llama", hidden=hidden, heads=heads, inter=inter)
                                        for _ in range(layers))
            self.norm = torchfast.nn.RMSNorm(hidden, eps=1e-6)
            self.lm_loss = torchfast.nn.LinearCrossEntropyLoss(hidden, vocab, chunk_size=1024)

        def forward(self, tokens):
            x = self.embed_tokens(tokens[:, :-1])
            for layer in self.layers:
                x = layer(x)
            target = tokens[:, 1:]
            if hasattr(x, "device_mesh"):  # tensor parallel: the targets sharded like the tokens
                from torch.distributed.tensor import DTensor, Replicate

                target = DTensor.from_local(target, x.device_mesh, [Replicate()], run_check=False)
                target = target.redistribute(x.device_mesh, x.placements)  # a local slice, no collective
            return self.lm_loss(self.norm(x), target)

    def train(model, steps, batch, seq, vocab):
        tp = args.engine == "tp"
        if args.engine == "ddp":
            model = torchfast.distributed.wrap(model)
        elif tp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(world.device.type, (world.world_size,))
            torchfast.distributed.parallelize(model, mesh, tp_plan(len(model.layers)))
        else:
            if args.engine == "fsdp-checkpoint":
                for block in model.layers:
                    block.checkpointed = True
            torchfast.distributed.shard(model, reshard_after_forward=args.engine != "fsdp-no-reshard")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, vocab, (batch * world.world_size, seq + 1), generator=g)
                   for _ in range(steps)]
        # Tensor parallel ranks all work on the whole global batch; data-parallel ones on their share.
        rows = slice(None) if tp else slice(world.rank * batch, (world.rank + 1) * batch)
        times, losses = [], []
        for tokens in batches:
            t0 = time.perf_counter()
            loss = model(tokens[rows])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torchfast.distributed.barrier()
            times.append(time.perf_counter() - t0)
            if tp:  # a DTensor: the same global loss on every rank
                losses.append(loss.detach().full_tensor().double().item())
            else:
                losses.append(torchfast.distributed.all_reduce_mean(loss.detach().double()).item())
        return times, losses

    # A small model through the same engine first: the one-time costs (lazy imports, thread pools,
    # library state) are then outside the measured peak.
    torch.manual_seed(0)
    train(LM(64, 1, 4, 128, 256), 2, 1, 16, 256)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the model and its training
    base_kb = _status_kb("VmRSS")
    torch.manual_seed(0)
    model = LM(args.hidden, args.layers, args.heads, args.inter, args.vocab)
    params = sum(p.numel() for p in model.parameters())
    times, losses = train(model, args.steps + 1, args.batch, args.seq, args.vocab)
    result = {"engine": args.engine, "rank": world.rank, "params": params,
              "peak_growth_mb": (_status_kb("VmHWM") - base_kb) / 1024,
              "step_ms": statistics.median(times[1:]) * 1e3, "loss": losses[-1]}
    Path(args.out, f"{args.engine}-rank{world.rank}.json").write_text(json.dumps(result))
    torchfast.distributed.cleanup()


def tp_plan(layers: int) -> dict:
    """Tensor + sequence parallel plan of the benchmark's LM (Llama blocks of tests/train/tiny_lm.py).

    The residual stream is a DTensor sharded on tokens (Shard(1)); the norms run on it under
    torchfast's SequenceParallel (AddRMSNorm takes two inputs, torch's style only one); attention
    gathers its input once, runs q/k/v/o as Colwise/Rowwise on local heads (torch 2.13 has no DTensor
    rule for CPU attention) and reduce-scatters back to tokens; the SwiGLU MLP keeps DTensors, so the
    fused swiglu runs on the Shard(-1) intermediate through its sharding rule.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    from torchfast.distributed import SequenceParallel

    seq, rep = Shard(1), Replicate()
    to_tokens = RowwiseParallel(output_layouts=seq, use_local_output=False)
    plan = {
        "embed_tokens": RowwiseParallel(input_layouts=rep, output_layouts=seq, use_local_output=False),
        "norm": SequenceParallel(),
        "lm_loss": SequenceParallel(),  # replicated classifier on token-sharded hidden states
    }
    for i in range(layers):
        p = f"layers.{i}"
        plan |= {
            f"{p}.input_layernorm": SequenceParallel(),
            f"{p}.self_attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,)),
            f"{p}.self_attn.q_proj": ColwiseParallel(),
            f"{p}.self_attn.k_proj": ColwiseParallel(),
            f"{p}.self_attn.v_proj": ColwiseParallel(),
            f"{p}.self_attn.o_proj": to_tokens,
            f"{p}.post_attention_layernorm": SequenceParallel(),
            f"{p}.mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,),
                                           use_local_output=False),
            f"{p}.mlp.gate_proj": ColwiseParallel(use_local_output=False),
            f"{p}.mlp.up_proj": ColwiseParallel(use_local_output=False),
            f"{p}.mlp.down_proj": to_tokens,
        }
    return plan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--inter", type=int, default=None, help="default: 8/3 hidden, rounded to 64")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch", type=int, default=2, help="sequences per process")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, vocab 512, seq 32, 1 step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # inside torchrun
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab, args.seq, args.steps = 64, 2, 4, 512, 32, 1
    if args.inter is None:
        args.inter = (8 * args.hidden // 3 + 63) // 64 * 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine is not None:
        worker(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as out:
        names = ("hidden", "layers", "heads", "inter", "vocab", "batch", "seq", "steps", "threads")
        forwarded = [f"--{k}={getattr(args, k)}" for k in names]
        # Every block of 64 KB or more is mmapped and unmapped on free, so RSS follows the live tensors:
        # with glibc's default (dynamic) threshold, freed blocks of a few MB stay in the heap and in RSS
        # (measured here: FSDP2's peak looked like DDP's, ~1 GB for both, while its live state is half).
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
        for engine in args.engines:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", __file__, f"--engine={engine}", f"--out={out}",
                   *forwarded]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            ranks = [json.loads(Path(out, f"{engine}-rank{r}.json").read_text()) for r in range(args.nproc)]
            rows.append(ranks[0] | {"peak_growth_mb_max": max(r["peak_growth_mb"] for r in ranks)})
    params = rows[0]["params"]
    losses = [r["loss"] for r in rows]
    if max(losses) - min(losses) > 1e-4 * abs(losses[0]):  # an engine that trains something else
        print(f"bench_distributed: the engines' last losses differ: {dict(zip(args.engines, losses))}",
              file=sys.stderr)
        return 1
    print(f"{params / 1e6:.1f}M parameters (16 bytes each = {16 * params / 2**20:.0f} MB of weights, "
          f"gradients and AdamW state), {args.nproc} processes x {args.batch} x {args.seq} tokens, "
          f"{args.threads} thread(s) each, CPU/Gloo")
    print(f"{'engine':18s} {'peak RSS growth/rank':>21s} {'step':>10s} {'last loss':>10s}")
    for r in rows:
        peak, ms, loss = r["peak_growth_mb_max"], r["step_ms"], r["loss"]
        print(f"{r['engine']:18s} {peak:17.0f} MB {ms:7.0f} ms {loss:10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
