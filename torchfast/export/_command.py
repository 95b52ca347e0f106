"""`torchfast export MODULE:FACTORY --input-shape ... --onnx out.onnx [--optimize] [--verify]
[--quantize int8]`: build a model from a Python factory, optionally optimize it, export it to ONNX,
and print what was fused, the export check and the file sizes. torchfast/cli.py parses the command
line and maps `CommandError` to exit status 2."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import TextIO

import torch
from torch import nn


class CommandError(ValueError):
    """A bad argument of `torchfast export` (exit status 2): the message says which and why."""


def load_factory(target: str):
    """The callable named by "MODULE:FACTORY" (MODULE a dotted module importable from the current
    folder, or a path to a .py file; FACTORY a dotted attribute path inside it)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(
            f"'{target}' is not MODULE:FACTORY (e.g. mypkg.models:make_model or " "models.py:make_model)"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"'{target}': no such file {path}")
            # Under a name of its own: a file called copy.py must not replace the stdlib's module.
            name = f"_torchfast_export_factory_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # what dataclasses and pickling inside the file look up
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CommandError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure to import is the user's module's)
        raise CommandError(f"cannot import '{module_name}' from '{target}': {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"'{target}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"'{target}' is a {type(obj).__name__}, not a callable that returns a model")
    return obj


def build_model(target: str) -> nn.Module:
    factory = load_factory(target)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise CommandError(f"'{target}' raised {type(e).__name__}: {e} when called with no arguments") from e
    if not isinstance(model, nn.Module):
        raise CommandError(f"'{target}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """'8,16' or '8x16' -> (8, 16): positive integers."""
    parts = [p for p in re.split(r"[,x×\s]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise CommandError(
            f"--input-shape {text!r} is not a list of positive integers such as 8,16 or 8x3x32x32"
        )
    return shape


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def run(
    target: str,
    shapes: list[str],
    onnx_path: str,
    *,
    optimize: bool,
    verify: bool,
    quantize: str | None,
    dynamic_sequence: bool,
    out: TextIO,
) -> int:
    """The command; returns the exit status (0 ok, 1 export or check failed). Raises CommandError."""
    import torchfast
    from torchfast.export import OnnxVerificationError, onnx

    dims = [parse_shape(s) for s in shapes]
    if not Path(onnx_path).parent.exists():
        raise CommandError(f"--onnx {onnx_path}: folder {Path(onnx_path).parent} does not exist")
    model = build_model(target).eval()
    inputs = tuple(torch.randn(d) for d in dims)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model    {target} -> {type(model).__name__}, {n_params:,} parameters, inputs "
        f"{', '.join(str(list(d)) for d in dims)}",
        file=out,
    )
    if optimize:
        try:
            model, report = torchfast.optimize(model, verify=verify, example_inputs=inputs)
        except torchfast.OptimizeVerificationError as e:
            print(f"optimize FAILED: {e}", file=out)
            return 1
        print(report.table(), file=out)
    try:
        path, max_error = onnx(model, inputs, onnx_path, verify=verify, dynamic_sequence=dynamic_sequence)
    except OnnxVerificationError as e:
        print(f"onnx     FAILED: {e}", file=out)
        return 1
    dyn = "dynamic batch" + (" and sequence" if dynamic_sequence else "")
    check = (
        f"verified in onnxruntime, max abs error {max_error:.2g}" if verify else "not verified (no --verify)"
    )
    print(f"onnx     {path}  {_size(path)}  (standard ONNX ops, {dyn}; {check})", file=out)
    if quantize == "int8":
        q_path = str(Path(path).with_suffix("")) + ".int8.onnx"
        from torchfast.compress import quantize_onnx

        err = quantize_onnx(path, q_path, mode="dynamic", calibration_data=inputs[0]).max_error
        ratio = os.path.getsize(q_path) / os.path.getsize(path)
        print(
            f"int8     {q_path}  {_size(q_path)}  ({ratio:.2f}x of float; dynamic int8 weights; "
            f"max abs error vs the float ONNX model {err:.2g}, from quantization, not checked against a "
            "tolerance)",
            file=out,
        )
    return 0
