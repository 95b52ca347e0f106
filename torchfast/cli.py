"""The `torchfast` command (also `python -m torchfast`): argument parsing and printing only.

    torchfast info [--json]                  what this install can do (torchfast.build_info())
    torchfast demo [--steps N] [--out DIR]   the main job: train, export, verify, time (torchfast/demo.py)

Exit status: 0 on success, 1 when the demo fails a check, 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchfast", description="torchfast: fused CPU/CUDA/Triton kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print what this install can do (compiled ISAs, CUDA, Triton, GPU)")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")

    demo = sub.add_parser(
        "demo", help="train a small torchfast MLP, export it to ONNX, verify it, time swish",
        description="Train a small MLP with torchfast.nn.Swish on a synthetic teacher under autocast, check "
                    "the loss fell, export to ONNX and verify it in onnxruntime, and time swish vs eager.")
    demo.add_argument("--steps", type=_positive_int, default=300, help="training steps (default: 300)")
    demo.add_argument("--out", default="out", metavar="DIR",
                      help="folder for the ONNX file (default: ./out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: 0)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where to train and time (default: the GPU when one is visible)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (`torchfast info | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        from torchfast._info import build_info, format_build_info

        print(json.dumps(build_info(), indent=2) if args.json else format_build_info())
        return 0

    from torchfast import build_info, demo

    try:
        result = demo.run(steps=args.steps, out=args.out, seed=args.seed, device=args.device,
                          log=sys.stdout, progress=sys.stderr)
    except demo.DemoError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; rank 0 says why
            print(f"torchfast demo: FAILED: {e}", file=sys.stderr)
        return 1
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(demo.format_summary(result, build_info()))
    print("torchfast demo: OK")
    return 0
