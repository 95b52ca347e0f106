"""`torchfast.export.onnx`: export a model that uses torchfast ops to standard ONNX, and check it.

The exported graph holds standard-domain ONNX ops only (each torchfast op is translated, e.g. swish to
`Swish` from opset 24 and to `Sigmoid` + `Mul` below), so any ONNX runtime runs it without torchfast.
onnx, onnxscript and onnxruntime are imported when an export runs, not when torchfast is imported.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

from torchfast._util import dropped_log_records, eval_mode
from torchfast.export import _tables
from torchfast.export._tables import DEFAULT_OPSET
from torchfast.testing import TOLERANCES

EXPORTERS = ("dynamo", "torchscript")

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


def _check_arguments(model, args, exporter: str, opset: int | None, dynamic_batch: bool,
                     dynamic_sequence: bool = False) -> tuple[tuple[torch.Tensor, ...], int]:
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
    if dynamic_sequence:
        seq = [a.shape[1] for a in args if a.dim() >= 2]
        if not seq:
            raise _fail("args", "holds no input with 2 or more dimensions, so dynamic_sequence=True has no "
                        "sequence axis (dim 1) to mark")
        if len(set(seq)) > 1:
            raise _fail("args", "holds inputs with different sizes of dim 1 "
                        f"({', '.join(map(str, seq))}); with "
                        "dynamic_sequence=True dim 1 of every input with 2+ dimensions is the sequence axis")
        if seq[0] < 2:
            raise _fail("args", "has a sequence axis (dim 1) of size < 2; give an example with a longer "
                        "sequence "
                        "(torch.export specializes sizes 0 and 1)")
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
def _quiet_dynamo_exporter() -> Iterator[None]:
    """Silence two notices the dynamo exporter prints on every export that concern torch, not the
    model: a log line per torchvision op it skips when torchvision is absent, and a FutureWarning from
    torch's own pytree internals. Everything else it reports passes through."""
    with dropped_log_records(["torch.onnx._internal.exporter._registration"], "torchvision is not installed"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield


def _dynamic_dims(args, dynamic_batch: bool, dynamic_sequence: bool) -> list[dict[int, str]]:
    """Per input, {dim: symbolic name}: dim 0 "batch", dim 1 (inputs of 2+ dims) "sequence"."""
    dims = []
    for a in args:
        d = {0: "batch"} if dynamic_batch else {}
        if dynamic_sequence and a.dim() >= 2:
            d[1] = "sequence"
        dims.append(d)
    return dims


def _export_dynamo(model, args, path, opset, dynamic_batch, input_names, dynamic_sequence=False):
    dynamic_shapes = None
    if dynamic_batch or dynamic_sequence:
        # One Dim per name, shared by every input: their batch (and sequence) sizes agree.
        named = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence")}
        dynamic_shapes = tuple({i: named[n] for i, n in d.items()} or None
                               for d in _dynamic_dims(args, dynamic_batch, dynamic_sequence))
    with _quiet_dynamo_exporter():
        torch.onnx.export(
            model, args, path, dynamo=True, opset_version=opset, verbose=False,
            custom_translation_table=_tables.onnx_translation_table(opset),
            dynamic_shapes=dynamic_shapes, input_names=input_names,
            # One self-contained file, as the TorchScript exporter writes; torch still moves the weights
            # to a side file when the model exceeds protobuf's 2 GB limit.
            external_data=False,
        )


def _export_torchscript(model, args, path, opset, dynamic_batch, input_names, n_outputs,
                        dynamic_sequence=False):
    _tables.ensure_symbolics_registered()
    output_names = [f"output_{i}" for i in range(n_outputs)]
    dynamic_axes = None
    if dynamic_batch or dynamic_sequence:
        dims = _dynamic_dims(args, dynamic_batch, dynamic_sequence)
        dynamic_axes = {n: d for n, d in zip(input_names, dims) if d}
        if dynamic_batch:
            dynamic_axes.update({name: {0: "batch"} for name in output_names})
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


def _other_sequence(args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs with a longer sequence (s + 3 along dim 1 of inputs with 2+ dims), repeating positions."""
    s = next(a.shape[1] for a in args if a.dim() >= 2)
    pos = torch.arange(s + 3) % s
    return tuple(a.index_select(1, pos.to(a.device)) if a.dim() >= 2 else a for a in args)


def _other_batch(args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The inputs with a different batch size (b + 2 rows), made by repeating the given rows, so that
    inputs that must hold valid values (token ids, masks) stay valid."""
    b = args[0].shape[0]
    rows = torch.arange(b + 2) % max(b, 1)
    return tuple(a.index_select(0, rows.to(a.device)) if b else a.new_zeros((b + 2,) + a.shape[1:])
                 for a in args)


STANDARD_DOMAINS = ("", "ai.onnx")


def _check_graph(path: str, dynamic: list[dict[int, str]], input_names: list[str]) -> None:
    import onnx

    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    local = {(f.domain, f.name) for f in model.functions}
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes
                     if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in local})
    if custom:
        raise OnnxVerificationError(f"torchfast.export.onnx: {path} holds non-standard ops {custom}; only "
                                    "the "
                                    "standard ONNX domain is allowed")
    wanted = dict(zip(input_names, dynamic))
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        for axis, name in wanted.get(graph_input.name, {}).items():
            if axis < len(dims) and not dims[axis].dim_param:
                raise OnnxVerificationError(
                    f"torchfast.export.onnx: input '{graph_input.name}' of {path} has a fixed dim {axis} "
                    f"({dims[axis].dim_value}) although it was marked dynamic ({name})")


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
        try:
            got = session.run(None, feed)
        except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
            raise OnnxVerificationError(
                f"torchfast.export.onnx: onnxruntime cannot run {path} at input shape {list(args[0].shape)}: "
                f"{str(e).strip()[:300]} (a shape the exporter fixed while tracing? the legacy exporter "
                "does this for some modules; try exporter='dynamo')") from e
        where = f"{path} at input shape {list(args[0].shape)}, batch size {args[0].shape[0]}"
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
         dynamic_sequence: bool = False, exporter: str = "dynamo", opset: int | None = None,
         verify: bool = True, rtol: float | None = None, atol: float | None = None) -> OnnxExport:
    """Export `model(*args)` to an ONNX file of standard ops at `path`, check it, and verify it.

    Args:
        model: the nn.Module; exported (and verified) in eval mode, then put back in its own mode.
        args: the example input Tensor, or a tuple of them (the model's positional inputs).
        path: the .onnx file to write (its folder must exist).
        dynamic_batch: make dim 0 of every input (and output) a symbolic "batch" axis.
        dynamic_sequence: also make dim 1 of every input with 2+ dimensions a symbolic "sequence" axis
            (token ids, hidden states); verification then also runs a sequence 3 positions longer.
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

    The file always passes `onnx.checker.check_model(full_check=True)`, holds only standard-domain ops,
    and the axes marked dynamic are symbolic in its inputs. Raises ValueError/TypeError for bad arguments
    and OnnxVerificationError when onnxruntime disagrees. Returns OnnxExport(path, max_error): the largest absolute difference
    seen in verification (None when verify=False).
    """
    args, opset = _check_arguments(model, args, exporter, opset, dynamic_batch, dynamic_sequence)
    if verify and any(a.dtype == torch.bfloat16 for a in args):
        raise _fail("args", "holds bfloat16 tensors, which onnxruntime cannot be fed (numpy has no "
                    "bfloat16); export in float32 or float16, or pass verify=False")
    path = os.fspath(path)
    input_names = [f"input_{i}" for i in range(len(args))]
    # Export and check the inference graph (dropout off, batch-norm running statistics), the way the
    # TorchScript exporter does by default; every submodule gets its mode back.
    with eval_mode(model):
        if exporter == "dynamo":
            _export_dynamo(model, args, path, opset, dynamic_batch, input_names, dynamic_sequence)
        else:
            with torch.no_grad():
                n_outputs = len(_flatten(model(*args)))
            _export_torchscript(model, args, path, opset, dynamic_batch, input_names, n_outputs,
                                dynamic_sequence)
        _check_graph(path, _dynamic_dims(args, dynamic_batch, dynamic_sequence), input_names)
        if not verify:
            return OnnxExport(path, None)
        batches = [args, _other_batch(args)] if dynamic_batch else [args]
        if dynamic_sequence:
            batches.append(_other_sequence(args))
        return OnnxExport(path, _verify(model, path, batches, input_names, rtol, atol))
