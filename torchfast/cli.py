"""The `torchfast` command (also `python -m torchfast`): argument parsing and printing only.

    torchfast info [--json]                  what this install can do (torchfast.build_info())
    torchfast demo [--steps N] [--out DIR]   the main job: train, export, verify, time (torchfast/demo.py)
    torchfast export MODULE:FACTORY --input-shape 8,16 --onnx out.onnx [--optimize] [--verify]
                     [--quantize int8] [--dynamic-sequence]     (torchfast/export/_command.py)

Exit status: 0 on success, 1 when the demo or an export check fails, 2 on a bad command line (including
an export factory that does not import or returns no nn.Module).
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

    export = sub.add_parser(
        "export", help="export a model built by a Python factory to ONNX (optionally optimized, int8)",
        description="Build a model by calling FACTORY() from MODULE (a dotted module importable from the "
                    "current folder, or a .py file), optionally swap in torchfast's fused modules "
                    "(torchfast.optimize), export it to ONNX with standard ops and a dynamic batch axis, "
                    "and print what was fused, the export check and the file sizes.")
    export.add_argument("target", metavar="MODULE:FACTORY",
                        help="e.g. mypkg.models:make_model or models.py:make")
    export.add_argument("--input-shape", action="append", required=True, metavar="SHAPE",
                        help="shape of one float32 input, e.g. 8,16 (repeat for several inputs)")
    export.add_argument("--onnx", required=True, metavar="PATH", help="the .onnx file to write")
    export.add_argument("--optimize", action="store_true", help="run torchfast.optimize on the model first")
    export.add_argument("--verify", action="store_true",
                        help="verify the optimized model against the original, and the ONNX file in "
                             "onnxruntime")
    export.add_argument("--quantize", choices=("int8",), default=None,
                        help="also write PATH.int8.onnx with dynamically quantized int8 weights")
    export.add_argument("--dynamic-sequence", action="store_true",
                        help="make dim 1 of the inputs a symbolic sequence axis too")
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

    if args.command == "export":
        from torchfast.export._command import CommandError, run

        try:
            return run(args.target, args.input_shape, args.onnx, optimize=args.optimize, verify=args.verify,
                       quantize=args.quantize, dynamic_sequence=args.dynamic_sequence, out=sys.stdout)
        except CommandError as e:
            print(f"torchfast export: error: {e}", file=sys.stderr)
            return 2

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
