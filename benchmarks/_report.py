"""Tables and target verdicts shared by the fused-activation benches (bench_bias_act.py, bench_glu.py).

Every case carries params {"op", "mode", "dtype", "shape", "numel", ...}; a bench names one target
variant ("torchfast") and its baselines. Speedups are the harness's: medians of paired per-repeat
ratios t_baseline / t_torchfast (> 1: torchfast is faster)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import harness as H
import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
MODES = ("fwd", "fwd+bwd")


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def common_args(p: argparse.ArgumentParser, default_shapes: list[str]) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=list(DTYPES),
        help="default: float32 bfloat16 (float32 with --quick)",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="AxB",
        help=f"tensor shapes, e.g. 2048x4096 (default: {' '.join(default_shapes)})",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved samples per variant (default 9)")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed calls per variant before timing (torch.compile needs a few to settle)",
    )
    p.add_argument("--min-block-ms", type=float, default=20.0, help="minimum duration of one timed sample")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="wall time, or process CPU time (robust on a shared machine; meaningful at --threads 1 only)",
    )
    p.add_argument("--quick", action="store_true", help="one tiny shape, few repeats: a smoke test")
    p.add_argument("--json", default=None, help="where to write results (default benchmarks/results/...)")


def finish_args(
    p: argparse.ArgumentParser, args: argparse.Namespace, default_shapes: list[str], quick_shape: str
) -> argparse.Namespace:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    if args.device == "cuda" and args.clock != "wall":
        p.error("--clock process measures CPU time; on CUDA the times come from CUDA events")
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    raw = args.shapes or ([quick_shape] if args.quick else default_shapes)
    try:
        args.shapes = [tuple(int(s) for s in r.lower().split("x")) for r in raw]
    except ValueError:
        p.error(f"--shapes are like 2048x4096, got {raw}")
    args.repeats = args.repeats or (3 if args.quick else 9)
    if args.quick:
        args.min_block_ms = min(args.min_block_ms, 1.0)
    return args


def config(args) -> H.Config:
    return H.Config(
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        min_block_s=args.min_block_ms / 1e3,
        clock=args.clock,
    )


compiled = H.compiled  # one torch.compile wrapper per composite (harness.py)


def times_table(
    results: list[H.CaseResult], names: list[str], baselines: list[str], target: str = "torchfast"
) -> str:
    headers = ["op", "mode", "dtype", "shape"] + [f"{n} ms" for n in names] + [f"vs {b}" for b in baselines]
    rows = []
    for r in results:
        p = r.params
        row = [p["op"], p["mode"], p["dtype"], p["shape"]]
        row += [H.fmt_ms(r.variants[n].ms) if n in r.variants else "-" for n in names]
        row += [
            H.fmt_ratio(r.speedup(target, b).median) if target in r.variants and b in r.variants else "-"
            for b in baselines
        ]
        rows.append(row)
    return H.format_table(
        headers,
        rows,
        f"Times: median ms per call ± half the IQR; 'vs X' = speedup of {target} "
        "over X (median of paired ratios; > 1 means torchfast is faster)",
    )


def bandwidth_table(results: list[H.CaseResult], names: list[str], traffic: str) -> str:
    headers = ["op", "mode", "dtype", "shape", "copy GB/s"] + [f"{n} GB/s (%copy)" for n in names]
    rows = []
    for r in results:
        p = r.params
        row = [p["op"], p["mode"], p["dtype"], p["shape"], f"{r.copy.gbps:.1f}" if r.copy else "-"]
        for n in names:
            v = r.variants.get(n)
            frac = f" ({v.copy_fraction * 100:.0f}%)" if v is not None and v.copy_fraction is not None else ""
            row.append("-" if v is None or v.gbps is None else f"{v.gbps:.1f}{frac}")
        rows.append(row)
    return H.format_table(
        headers,
        rows,
        f"Achieved bandwidth: minimum bytes moved ({traffic}) / median time, and as % "
        "of a same-traffic copy_ timed in the same interleaving",
    )


def saved_table(
    results: list[H.CaseResult], names: list[str], input_bytes: Callable[[dict], int], what: str
) -> str:
    """Saved bytes per variant at the largest fwd+bwd case of each (op, dtype), over `what`'s bytes."""
    last = {}
    for r in results:
        if r.params["mode"] == "fwd+bwd":
            key = (r.params["op"], r.params["dtype"])
            if key not in last or r.params["numel"] >= last[key].params["numel"]:
                last[key] = r
    rows = []
    for (op, dtype), r in last.items():
        for n in names:
            s = r.variants[n].saved if n in r.variants else None
            if s is not None:
                rows.append(
                    [
                        op,
                        dtype,
                        r.params["shape"],
                        n,
                        H.fmt_bytes(s.bytes),
                        f"{s.bytes / input_bytes(r.params):.2f}",
                        s.tensors,
                        s.saves,
                    ]
                )
    headers = ["op", "dtype", "shape", "variant", "saved", f"× {what}", "tensors", "saves"]
    return H.format_table(
        headers,
        rows,
        "Saved for backward (saved_tensors_hooks; distinct tensors, a tensor saved twice counts once)",
    )


def summary(
    results: list[H.CaseResult],
    targets: dict[str, float],
    dtypes: Sequence[str],
    target: str = "torchfast",
    mode: str = "fwd+bwd",
) -> dict:
    """Per op and dtype: the median over shapes of `target`'s speedup over each baseline in `mode`,
    against the need in `targets` (baseline -> minimum speedup), PASS/FAIL."""
    out = {"mode": mode, "target": target, "entries": []}
    ops = list(dict.fromkeys(r.params["op"] for r in results))
    for op in ops:
        for dtype in dtypes:
            rs = [
                r
                for r in results
                if r.params["op"] == op
                and r.params["dtype"] == dtype
                and r.params["mode"] == mode
                and target in r.variants
            ]
            for base, need in targets.items():
                per_shape = {
                    r.params["shape"]: r.speedup(target, base).median for r in rs if base in r.variants
                }
                med = H.Stats.of(list(per_shape.values())).median if per_shape else None
                status = "n/a" if med is None else ("PASS" if med >= need else "FAIL")
                out["entries"].append(
                    {
                        "op": op,
                        "dtype": dtype,
                        "baseline": base,
                        "need": need,
                        "median": med,
                        "per_shape": per_shape,
                        "status": status,
                    }
                )
    return out


def summary_text(s: dict, title: str) -> str:
    rows = []
    for e in s["entries"]:
        per = ", ".join(f"{k} {v:.2f}x" for k, v in e["per_shape"].items())
        rows.append(
            [
                e["op"],
                e["dtype"],
                f"vs {e['baseline']}",
                f">= {e['need']:.2f}x",
                "-" if e["median"] is None else f"{e['median']:.2f}x",
                e["status"],
                per,
            ]
        )
    return H.format_table(
        ["op", "dtype", "speedup", "target", "median", "result", "per shape"],
        rows,
        f"{title}: {s['mode']}, median over shapes of {s['target']}'s speedup",
    )


def header(name: str, args, threads: int, env: dict, ceiling: float) -> str:
    info = env["torchfast"] if isinstance(env["torchfast"], dict) else {}
    load = env.get("load_average_1min")
    return (
        f"{name}: {args.device} ({env['device_name']}), torch {torch.__version__}, threads {threads}, "
        f"torchfast CPU ISA {info.get('cpu_isa_active')}, load average {load if load is not None else '?'}\n"
        f"  {args.repeats} interleaved repeats, warm-up {args.warmup}, samples >= {args.min_block_ms:g} ms; "
        f"copy_ bandwidth {ceiling:.1f} GB/s (read+write); every variant allocates its outputs; clock {args.clock}\n"
        f"  TORCHINDUCTOR_COMPILE_THREADS={os.environ.get('TORCHINDUCTOR_COMPILE_THREADS')}"
    )
