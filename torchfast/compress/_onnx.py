"""`quantize_onnx`: int8 quantization of an ONNX file with onnxruntime.quantization, checked by running it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from torchfast._util import dropped_log_records
from torchfast.compress._common import check_choice, fail

ONNX_MODES = ("dynamic", "static")


class QuantizedOnnx(NamedTuple):
    """What `quantize_onnx` returns: the file written, and the largest absolute difference between the
    int8 and the float model's outputs in onnxruntime on the check input."""

    path: str
    max_error: float


def _load_checked(src: str):
    import onnx

    if not os.path.isfile(src):
        raise fail("quantize_onnx", "src", f"is {src!r}, which is not a file", FileNotFoundError)
    try:
        model = onnx.load(src)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... for a file that isn't ONNX
        raise fail("quantize_onnx", "src", f"is {src!r}, which is not a valid ONNX model "
                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return model


def _as_numpy(batch) -> np.ndarray:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


def _batches(calibration_data) -> list[np.ndarray]:
    if calibration_data is None:
        return []
    if isinstance(calibration_data, (torch.Tensor, np.ndarray)):
        return [_as_numpy(calibration_data)]
    return [_as_numpy(b) for b in calibration_data]


def _sample_input(model) -> np.ndarray:
    """A random float input for the graph's first input, symbolic dims set to 2."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else 2 for d in dims]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _make_reader(name: str, batches: list[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    return Reader()


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, mode: str = "dynamic",
                  calibration_data=None) -> QuantizedOnnx:
    """Quantize an ONNX model to int8 with onnxruntime.quantization, write it to `dst`, and check it
    by running it in onnxruntime next to the float model.

    The deployment path for a model exported with torchfast.export.onnx: its graph holds standard ONNX
    ops only, so onnxruntime's quantizer handles it like any other model.

    Args:
        src: the float ONNX file. Never modified (`dst` must be another path).
        dst: the int8 ONNX file to write.
        mode: "dynamic" (quantize_dynamic: int8 weights, activations quantized per call; MatMul/Gemm
            become MatMulInteger / DynamicQuantizeMatMul) or "static" (quantize_static: QDQ format,
            uint8 activations with scales from calibration, per-channel int8 weights).
        calibration_data: the first graph input's values: a Tensor/array (one batch) or an iterable
            of batches (Tensors, arrays, or tuples whose first element is the input). Required for
            "static"; for "dynamic" optional, used as the check input (else a random one).

    The source is run through onnxruntime's quant_pre_process (shape inference, graph cleanup) into a
    temporary file first, as onnxruntime recommends. Returns QuantizedOnnx(path, max_error): max_error
    is the largest |int8 - float| output difference in onnxruntime on the first calibration batch (or
    the random input). Raises ValueError for a file that is not ONNX, a bad mode, src == dst, or a
    static run without calibration data.
    """
    check_choice("quantize_onnx", "mode", mode, ONNX_MODES)
    src, dst = os.fspath(src), os.fspath(dst)
    if Path(dst).resolve() == Path(src).resolve():
        raise fail("quantize_onnx", "dst", "is the same file as src; the input file is never overwritten, "
                   "give another path")
    model = _load_checked(src)
    batches = _batches(calibration_data)
    if mode == "static" and not batches:
        raise fail("quantize_onnx", "calibration_data", "is required for mode='static' (at least one "
                   "batch of the model's first input)")
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic
    from onnxruntime.quantization import quantize_static as ort_static

    with tempfile.TemporaryDirectory() as tmp:
        prepped = os.path.join(tmp, "prepped.onnx")
        quant_pre_process(src, prepped, skip_symbolic_shape=False)
        # Some onnxruntime versions log a pre-processing reminder (root logger) even for a
        # pre-processed model; only that record is dropped.
        with dropped_log_records([""], "Please consider pre-processing before quantization"):
            if mode == "dynamic":
                ort_dynamic(prepped, dst, weight_type=QuantType.QInt8)
            else:
                ort_static(prepped, dst, _make_reader(model.graph.input[0].name, batches),
                           quant_format=QuantFormat.QDQ, per_channel=True,
                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    x = batches[0] if batches else _sample_input(model)
    outs = []
    for path in (src, dst):
        sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x}))
    max_error = 0.0
    for f, q in zip(*outs):
        if f.shape != q.shape or not np.isfinite(q).all():
            raise RuntimeError(f"torchfast.compress.quantize_onnx: the int8 model {dst} gives an output of "
                               f"shape {q.shape} (finite: {bool(np.isfinite(q).all())}) where the float "
                               f"model gives {f.shape}")
        max_error = max(max_error, float(np.abs(f.astype(np.float64) - q).max(initial=0.0)))
    return QuantizedOnnx(dst, max_error)
