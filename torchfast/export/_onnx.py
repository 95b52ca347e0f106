"""`torchfast.export.onnx`: export a model that uses torchfast ops to standard ONNX, and check it.

The exported graph holds standard-domain ONNX ops only (each torchfast op is translated, e.g. swish to
`Swish` from opset 24 and to `Sigmoid` + `Mul` below), so any ONNX runtime runs it without torchfast.
onnx, onnxscript and onnxruntime are imported when an export runs, not when torchfast is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

from torchfast.export import _tables
from torchfast.testing import TOLERANCES

EXPORTERS = ("dynamo", "torchscript")

# Default opset per exporter: 20 for both, the default of torch.onnx.export itself.
# - dynamo: the Sigmoid+Mul graph of opset 20 runs on any runtime that runs the same model exported
#   with torch.nn.SiLU, and onnxruntime 1.32 fuses Sigmoid+Mul into its QuickGelu kernel, while it
#   runs opset 24's Swish by expanding the op's function body into Mul/Sigmoid/Mul (seen in its
#   optimized-model dump): on 2^20 float32 elements, one thread, 0.3 ms at opset 20 against 0.7 ms
#   at 24. So opset 24 buys neither portability nor speed today; ask for it with opset=24 when a
#   runtime implements Swish natively.
# - torchscript: 20 is the newest opset this exporter supports.
DEFAULT_OPSET = {"dynamo": 20, "torchscript": 20}
# dynamo: torch's translation library is written for opset 18; below it torch warns that it converts
# the graph down and that the conversion may fail. torchscript: torchfast's symbolics start at 9, the
# opset torch's own TorchScript symbolics are built on.
MIN_OPSET = {"dynamo": 18, "torchscript": 9}
TORCHSCRIPT_MAX_OPSET = 20


class OnnxExport(NamedTuple):
    """What `torchfast.export.onnx` returns: the file written, and the largest absolute difference
    between onnxruntime's outputs and the PyTorch model's over every verified input (None when
    verify=False)."""

    path: str
    max_error: float | None


class OnnxVerificationError(RuntimeError):
    """The exported ONNX model, run in onnxruntime, disagrees with the PyTorch model."""


def _fail(arg: str, why: str, kind: type[Exception] = ValueError) -> Exception:
    return kind(f"torchfast.export.onnx: argument '{arg}' {why}")


def _max_opset(exporter: str) -> int:
    if exporter == "torchscript":
        return TORCHSCRIPT_MAX_OPSET
    import onnx

    return onnx.defs.onnx_opset_version()


def _check_arguments(model, args, exporter: str, opset: int | None, dynamic_batch: bool
                     ) -> tuple[tuple[torch.Tensor, ...], int]:
    if not isinstance(model, nn.Module):
        raise _fail("model", f"must be a torch.nn.Module, got {type(model).__name__}", TypeError)
    if exporter not in EXPORTERS:
        raise _fail("exporter", f"is {exporter!r}; choose one of {', '.join(map(repr, EXPORTERS))}")
    args = (args,) if isinstance(args, torch.Tensor) else args
    if not isinstance(args, (tuple, list)) or not args:
        raise _fail("args", "must be a Tensor or a non-empty tuple of Tensors (the model's positional "
                    f"inputs), got {type(args).__name__}", TypeError)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise _fail("args", f"holds a {type(a).__name__} at position {i}; only Tensors are supported",
                        TypeError)
        if dynamic_batch and a.dim() == 0:
            raise _fail("args", f"holds a 0-d tensor at position {i}, which has no batch axis; "
                        "pass dynamic_batch=False to export with fixed shapes")
    if dynamic_batch and len({a.shape[0] for a in args}) > 1:
        raise _fail("args", "holds inputs with different sizes of dim 0 "
                    f"({', '.join(str(a.shape[0]) for a in args)}); with dynamic_batch=True dim 0 of "
                    "every input is the batch axis, so they must agree")
    if opset is None:
        opset = DEFAULT_OPSET[exporter]
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise _fail("opset", f"must be an int, got {type(opset).__name__}", TypeError)
    lo, hi = MIN_OPSET[exporter], _max_opset(exporter)
    if not lo <= opset <= hi:
        hint = ""
        if exporter == "dynamo" and opset < lo:
            hint = f"; for older opsets use exporter='torchscript' (opsets {MIN_OPSET['torchscript']}.." \
                   f"{TORCHSCRIPT_MAX_OPSET})"
        elif exporter == "torchscript" and opset > hi:
            hint = f"; opset {opset} needs exporter='dynamo'"
        raise _fail("opset", f"is {opset}; exporter={exporter!r} supports opsets {lo}..{hi}{hint}")
    return tuple(args), opset


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export and check the inference graph (dropout off, batch-norm running statistics), the way the
    TorchScript exporter does by default, and give every submodule back the mode it came in (a model
    may hold frozen submodules in eval mode while training; model.train() would lose that)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _DropRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_dynamo_exporter() -> Iterator[None]:
    """Silence two notices the dynamo exporter prints on every export that concern torch, not the
    model: a log line per torchvision op it skips when torchvision is absent, and a FutureWarning from
    torch's own pytree internals. Everything else it reports passes through."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropRecords("torchvision is not installed")
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


def _export_dynamo(model, args, path, opset, dynamic_batch, input_names):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")  # one Dim shared by every input: their batch sizes agree
        dynamic_shapes = tuple({0: batch} for _ in args)
    with _quiet_dynamo_exporter():
        torch.onnx.export(
            model, args, path, dynamo=True, opset_version=opset, verbose=False,
            custom_translation_table=_tables.onnx_translation_table(opset),
            dynamic_shapes=dynamic_shapes, input_names=input_names,
            # One self-contained file, as the TorchScript exporter writes; torch still moves the weights
            # to a side file when the model exceeds protobuf's 2 GB limit.
            external_data=False,
        )


def _export_torchscript(model, args, path, opset, dynamic_batch, input_names, n_outputs):
    _tables.ensure_symbolics_registered()
    output_names = [f"output_{i}" for i in range(n_outputs)]
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    torch.onnx.export(
        model, args, path, dynamo=False, opset_version=opset,
        input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
    )


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise TypeError(f"torchfast.export.onnx: the model returned a {type(out).__name__}; only Tensors and "
                    "tuples, lists or dicts of Tensors can be compared with the ONNX model")


def _other_batch(args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs with a different batch size (b + 2 rows), made by repeating the given rows, so that
    inputs that must hold valid values (token ids, masks) stay valid."""
    b = args[0].shape[0]
    rows = torch.arange(b + 2) % max(b, 1)
    return tuple(a.index_select(0, rows.to(a.device)) if b else a.new_zeros((b + 2,) + a.shape[1:])
                 for a in args)


def _check_graph(path: str, dynamic_batch: bool, input_names: list[str]) -> None:
    import onnx

    onnx.checker.check_model(path, full_check=True)
    if not dynamic_batch:
        return
    for graph_input in onnx.load(path, load_external_data=False).graph.input:
        if graph_input.name not in input_names:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if dims and not dims[0].dim_param:
            raise OnnxVerificationError(
                f"torchfast.export.onnx: input '{graph_input.name}' of {path} has a fixed dim 0 "
                f"({dims[0].dim_value}) although dynamic_batch=True")


def _tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    r, a = TOLERANCES.get(dtype, (0.0, 0.0))  # integer and bool outputs must match exactly
    return (r if rtol is None else rtol), (a if atol is None else atol)


def _verify(model, path: str, batches, input_names, rtol, atol) -> float:
    import onnxruntime

    from torchfast.testing import assert_close

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}
    max_error = 0.0
    for args in batches:
        with torch.no_grad():
            expected = _flatten(model(*args))
        feed = {n: a.detach().cpu().numpy() for n, a in zip(input_names, args) if n in graph_inputs}
        got = session.run(None, feed)
        where = f"{path} at batch size {args[0].shape[0]}"
        if len(got) != len(expected):
            raise OnnxVerificationError(f"torchfast.export.onnx: {where} gives {len(got)} outputs in "
                                        f"onnxruntime but the PyTorch model {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            g = torch.from_numpy(g)
            r, a = _tolerance(e.dtype, rtol, atol)
            try:
                assert_close(g, e, dtype=e.dtype, rtol=r, atol=a, what=f"output {i}")
            except AssertionError as err:
                raise OnnxVerificationError(
                    f"torchfast.export.onnx: onnxruntime disagrees with the PyTorch model on {where}: {err}"
                ) from None
            both_finite = g.isfinite() & e.cpu().isfinite()
            if both_finite.any():
                diff = (g.double() - e.detach().cpu().double()).abs()[both_finite]
                max_error = max(max_error, diff.max().item())
    return max_error


def onnx(model: nn.Module, args, path: str | os.PathLike, *, dynamic_batch: bool = True,
         exporter: str = "dynamo", opset: int | None = None, verify: bool = True,
         rtol: float | None = None, atol: float | None = None) -> OnnxExport:
    """Export `model(*args)` to an ONNX file of standard ops at `path`, check it, and verify it.

    Args:
        model: the nn.Module; exported (and verified) in eval mode, then put back in its own mode.
        args: the example input Tensor, or a tuple of them (the model's positional inputs).
        path: the .onnx file to write (its folder must exist).
        dynamic_batch: make dim 0 of every input (and output) a symbolic "batch" axis.
        exporter: "dynamo" (torch.onnx.export(dynamo=True), torchfast ops translated by the table from
            `onnx_translation_table`) or "torchscript" (the legacy exporter, dynamo=False, using the
            symbolics registered at `import torchfast`).
        opset: ONNX opset (default DEFAULT_OPSET[exporter], 20): dynamo 18..onnx's newest,
            torchscript 9..20. Swish is exported as `Swish` from opset 24, as `Sigmoid`+`Mul` below.
        verify: run the file in onnxruntime (CPU) on `args` and, with dynamic_batch, on inputs of
            another batch size (the given rows repeated to b + 2), and compare every output with the
            PyTorch model's: |ort - torch| <= atol + rtol * |torch| elementwise.
        rtol, atol: override the tolerance, by default torchfast.testing.TOLERANCES of the output dtype
            (exact for integer outputs). The table is per op; a deep model may need a looser one.

    The file always passes `onnx.checker.check_model(full_check=True)`, and with dynamic_batch its
    inputs' dim 0 is symbolic. Raises ValueError/TypeError for bad arguments and OnnxVerificationError
    when onnxruntime disagrees. Returns OnnxExport(path, max_error): the largest absolute difference
    seen in verification (None when verify=False).
    """
    args, opset = _check_arguments(model, args, exporter, opset, dynamic_batch)
    if verify and any(a.dtype == torch.bfloat16 for a in args):
        raise _fail("args", "holds bfloat16 tensors, which onnxruntime cannot be fed (numpy has no "
                    "bfloat16); export in float32 or float16, or pass verify=False")
    path = os.fspath(path)
    input_names = [f"input_{i}" for i in range(len(args))]
    with _eval_mode(model):
        if exporter == "dynamo":
            _export_dynamo(model, args, path, opset, dynamic_batch, input_names)
        else:
            with torch.no_grad():
                n_outputs = len(_flatten(model(*args)))
            _export_torchscript(model, args, path, opset, dynamic_batch, input_names, n_outputs)
        _check_graph(path, dynamic_batch, input_names)
        if not verify:
            return OnnxExport(path, None)
        batches = [args, _other_batch(args)] if dynamic_batch else [args]
        return OnnxExport(path, _verify(model, path, batches, input_names, rtol, atol))
