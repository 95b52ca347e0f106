"""Benchmark of torchfast.optimize on models written without torchfast: a Llama-style decoder stack
(hand-written RMSNorm with variance_epsilon, gated MLP with act_fn, SDPA attention) and a GPT-2-style
stack (nn.LayerNorm, GELU tanh written out, dropout), from tests/dropin/models.py.

For each model and mode (train: forward + backward + AdamW step; infer: forward under no_grad), four
variants are timed in interleaved repeats: the original eager, the optimized eager, torch.compile of
the original, torch.compile of the optimized. Printed: median time of each, the paired-median speedups
(optimized eager vs original eager, vs compiled original; compiled optimized vs compiled original),
and the activation bytes autograd saves in one training forward (parameters excluded; counted with
torch.autograd.graph.saved_tensors_hooks). Not a test: run it by hand.

    python benchmarks/bench_optimize.py                         # hidden 1024, 2 layers, 4 x 512 tokens
    python benchmarks/bench_optimize.py --quick                 # smoke run at tiny sizes
    python benchmarks/bench_optimize.py --models llama --no-compile --repeats 5
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile workers would compete for the cores

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import torchfast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402


def load_models():
    spec = importlib.util.spec_from_file_location("dropin_models", ROOT / "tests" / "dropin" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(name: str, args, M) -> torch.nn.Module:
    if name == "llama":
        return M.LlamaStack(
            args.layers, args.hidden, args.heads, args.intermediate or int(2.75 * args.hidden)
        )
    return M.GPT2Stack(args.layers, args.hidden, args.heads)


def saved_activation_bytes(model, x) -> int:
    """Bytes autograd keeps for backward in one forward, counting each tensor once and leaving out the
    parameters (the same in every variant)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return total


def make_step(model, x, mode):
    if mode == "infer":

        def step():
            with torch.no_grad():
                model(x)

        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_model(name, args, M) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    original = build(name, args, M).to(dtype)
    optimized, report = torchfast.optimize(original)
    print(report.table(), flush=True)
    x = torch.randn(args.batch, args.seq, args.hidden, dtype=dtype)
    variants = {"original": original, "optimized": optimized}
    if not args.no_compile:
        variants["compiled original"] = torch.compile(original)
        variants["compiled optimized"] = torch.compile(optimized)
    result = {"model": name, "replaced": [r.name for r in report.replaced], "modes": {}}
    for mode in args.modes:
        for m in variants.values():
            m.train(mode == "train")
        steps = {}
        for v, m in variants.items():
            t0 = time.perf_counter()
            steps[v] = make_step(m, x, mode)
            for _ in range(2):  # warm up (compiles here)
                steps[v]()
            print(
                f"  {name} {mode} {v}: warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
            )
        samples = {v: [] for v in variants}
        names = list(variants)
        for r in range(args.repeats):
            for v in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                steps[v]()
                samples[v].append(time.perf_counter() - t0)
        row = {"ms": {v: statistics.median(s) * 1e3 for v, s in samples.items()}}

        def speedup(base, new):
            return statistics.median(H.paired_ratios(samples[base], samples[new]))

        row["optimized vs original"] = speedup("original", "optimized")
        if not args.no_compile:
            row["optimized vs compiled original"] = speedup("compiled original", "optimized")
            row["compiled optimized vs compiled original"] = speedup(
                "compiled original", "compiled optimized"
            )
        if mode == "train":
            row["saved_bytes"] = {
                v: saved_activation_bytes(variants[v], x) for v in ("original", "optimized")
            }
            row["saved ratio"] = row["saved_bytes"]["optimized"] / row["saved_bytes"]["original"]
        result["modes"][mode] = row
    return result


def print_table(results, args) -> None:
    print(
        f"\ntokens {args.batch}x{args.seq}, hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats"
    )
    cols = ["original", "optimized", "compiled original", "compiled optimized"]
    print(
        f"{'model':<6} {'mode':<6} "
        + " ".join(f"{c:>19}" for c in cols)
        + "   opt/orig  opt/c.orig  c.opt/c.orig  saved"
    )
    for res in results:
        for mode, row in res["modes"].items():
            ms = " ".join(f"{row['ms'][c]:>16.1f} ms" if c in row["ms"] else f"{'-':>19}" for c in cols)
            sp = f"{row['optimized vs original']:>8.2f}x"
            sp += (
                f"  {row['optimized vs compiled original']:>9.2f}x"
                if "optimized vs compiled original" in row
                else f"  {'-':>10}"
            )
            sp += (
                f"  {row['compiled optimized vs compiled original']:>11.2f}x"
                if "compiled optimized vs compiled original" in row
                else f"  {'-':>12}"
            )
            saved = f"  {row['saved ratio']:.2f}x" if "saved ratio" in row else ""
            print(f"{res['model']:<6} {mode:<6} {ms}   {sp}{saved}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("llama", "gpt2"), default=["llama", "gpt2"])
    p.add_argument("--modes", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=None, help="Llama MLP width (default 2.75 x hidden)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats, no compile: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.heads, args.layers, args.batch, args.seq, args.repeats = 32, 4, 1, 2, 8, 2
        args.no_compile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    M = load_models()
    results = [run_model(name, args, M) for name in args.models]
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
