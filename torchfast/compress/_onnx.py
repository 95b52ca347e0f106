"""`quantize_onnx`: int8 quantization of an ONNX file with onnxruntime.quantization, checked by running it."""

from __future__ import annotations

import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch

from torchfast._util import dropped_log_records
from torchfast.compress._common import check_choice, fail

ONNX_MODES = ("dynamic", "static")

# The accuracy bound of quantize_onnx's check: relative L2 error ||int8 - float|| / ||float|| over every
# output element. int8 with per-tensor activation scales gives about 1-2% on an MLP (1.5% measured on
# a 256-512-64 MLP with reduce_range on an AVX2 CPU); onnxruntime's u8s8 kernels saturating on a CPU
# without VNNI gave 10-12%. 5% sits between: well above what int8 rounding costs, well below saturation.
INT8_MAX_REL_ERROR = 0.05

# /proc/cpuinfo flags of the x86 instructions that multiply u8 x s8 into 32-bit sums without the 16-bit
# intermediate that saturates (vpdpbusd): AVX512_VNNI, AVX_VNNI (AVX2-class CPUs), AMX-INT8.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class QuantizedOnnx(NamedTuple):
    """What `quantize_onnx` returns: the file written; the largest absolute difference and the relative
    L2 error (||int8 - float|| / ||float||) between the int8 and the float model's outputs in
    onnxruntime on the check input; whether weights were quantized to 7 bits (onnxruntime's
    reduce_range); and why that setting (the CPU decision, or a fallback after a failed check)."""

    path: str
    max_error: float
    rel_error: float = 0.0
    reduce_range: bool = False
    settings: str = ""


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def int8_settings(flags: Iterable[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """(reduce_range, why): the onnxruntime quantization setting accurate on this CPU.

    onnxruntime runs int8 matmuls as u8 activations x s8 weights. On x86 without VNNI its AVX2 /
    AVX-512 kernels add pairs of u8*s8 products in 16 bits (vpmaddubsw), which saturate once
    2 * 255 * 127 > 32767; quantizing weights to 7 bits (reduce_range=True) keeps the pairs in range.
    With VNNI (AVX512_VNNI, AVX_VNNI, AMX-INT8 in the flags) the products are summed in 32 bits, so the
    full 8 bits are safe and more accurate. Other architectures (ARM) do not use those kernels.
    `flags` defaults to /proc/cpuinfo's, `machine` to platform.machine(); where the flags cannot be
    read on x86, reduce_range=True, the setting accurate on every x86 CPU."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"{machine} CPU: onnxruntime's x86 u8s8 kernels (which saturate without VNNI) do not run here"
    flags = _cpu_flags() if flags is None else set(flags)
    if flags is None:
        return True, "CPU flags unreadable: reduce_range, accurate on every x86 CPU"
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return False, f"CPU has {vnni[0].upper()}: full 8-bit weights"
    return True, "CPU has no VNNI: 7-bit weights (reduce_range) so that onnxruntime's u8s8 kernels do not saturate"


def rel_l2_error(reference, other) -> float:
    """||other - reference|| / ||reference|| over every element (the absolute norm when reference is 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.linalg.norm((np.asarray(other, dtype=np.float64) - ref).ravel())
    scale = np.linalg.norm(ref.ravel())
    return float(diff / scale) if scale > 0 else float(diff)


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
                  calibration_data=None, reduce_range: bool | None = None,
                  max_rel_error: float | None = INT8_MAX_REL_ERROR) -> QuantizedOnnx:
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
        reduce_range: quantize weights to 7 bits. None (default): decided for the CPU this runs on by
            `int8_settings` (True on x86 without VNNI, where onnxruntime's u8s8 kernels saturate and
            made an MLP 10-12% off; False with AVX512_VNNI / AVX_VNNI / AMX-INT8 or off x86). The
            model is checked on the CPU that quantizes it: quantize on the CPU you deploy to.
        max_rel_error: the check's bound on ||int8 - float|| / ||float|| (all outputs of the check
            input); default INT8_MAX_REL_ERROR = 5%, about 3x what int8 rounding costs. None: no bound.

    The source is run through onnxruntime's quant_pre_process (shape inference, graph cleanup) into a
    temporary file first, as onnxruntime recommends. Returns QuantizedOnnx(path, max_error): max_error
    is the largest |int8 - float| output difference in onnxruntime on the first calibration batch (or
    the random input), rel_error the relative L2 error, reduce_range and settings what was used and
    why. When rel_error exceeds max_rel_error with the automatic choice reduce_range=False, the model
    is quantized again with reduce_range=True and a RuntimeWarning says so; when it still exceeds it, or
    reduce_range was given, RuntimeError (the file stays at dst for inspection). Raises ValueError for
    a file that is not ONNX, a bad mode, src == dst, or a static run without calibration data.
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
    if max_rel_error is not None and not max_rel_error > 0:
        raise fail("quantize_onnx", "max_rel_error", f"must be a positive number or None, got {max_rel_error!r}")
    x = batches[0] if batches else _sample_input(model)
    if reduce_range is None:
        rr, why = int8_settings()
    else:
        rr, why = bool(reduce_range), f"reduce_range={bool(reduce_range)} given"
    result = _quantize_and_check(src, dst, mode, model, batches, x, rr, why)
    if max_rel_error is None or result.rel_error <= max_rel_error:
        return result
    if reduce_range is None and not rr:
        warnings.warn(f"torchfast.compress.quantize_onnx: the int8 model was {result.rel_error:.1%} off "
                      f"(relative L2; bound {max_rel_error:.0%}) with full 8-bit weights ({why}); quantized "
                      "again with reduce_range=True", RuntimeWarning, stacklevel=2)
        result = _quantize_and_check(src, dst, mode, model, batches, x, True,
                                     f"reduce_range after 8-bit weights were {result.rel_error:.1%} off")
        if result.rel_error <= max_rel_error:
            return result
    raise RuntimeError(
        f"torchfast.compress.quantize_onnx: the int8 model {dst} is {result.rel_error:.1%} off the float model "
        f"(relative L2 error of the outputs; max abs error {result.max_error:.3g}), beyond the {max_rel_error:.0%} "
        f"int8 should give (reduce_range={result.reduce_range}: {result.settings}). Check the calibration data "
        "(mode='static'), keep sensitive layers in float, or pass max_rel_error to accept it. The file was "
        "left at dst for inspection.")


def _quantize_and_check(src: str, dst: str, mode: str, model, batches: list[np.ndarray], x: np.ndarray,
                        reduce_range: bool, why: str) -> QuantizedOnnx:
    """Quantize src into dst with the given weight range, then run both in onnxruntime on x."""
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
                ort_dynamic(prepped, dst, weight_type=QuantType.QInt8, reduce_range=reduce_range)
            else:
                ort_static(prepped, dst, _make_reader(model.graph.input[0].name, batches),
                           quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

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
    rel = rel_l2_error(np.concatenate([f.ravel() for f in outs[0]]), np.concatenate([q.ravel() for q in outs[1]]))
    return QuantizedOnnx(dst, max_error, rel, reduce_range, why)
