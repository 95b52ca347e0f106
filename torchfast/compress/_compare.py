"""`compare`: what compression cost and bought, for PyTorch modules and ONNX files alike."""

from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from torchfast._util import num_threads
from torchfast.compress._common import fail, state_dict_bytes
from torchfast.compress._onnx import INT8_MAX_REL_ERROR, int8_settings, rel_l2_error


@dataclass
class Comparison:
    """What `compare` returns. Sizes in bytes (a module's torch.save(state_dict()), an ONNX file's
    size), latencies in ms (median of interleaved repeats in one run), errors over every output element.
    top1_agreement: fraction of rows whose argmax matches (None unless outputs are (batch, classes>1));
    accuracy_*: fraction of rows whose argmax equals the labels (None without labels); rel_error:
    ||compressed - original|| / ||original|| (relative L2 over every output element)."""

    original_bytes: int
    compressed_bytes: int
    original_ms: float
    compressed_ms: float
    max_abs_error: float
    top1_agreement: float | None
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    threads: int = 1
    repeats: int = 0
    rel_error: float | None = None

    @property
    def size_ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes

    @property
    def speedup(self) -> float:
        return self.original_ms / self.compressed_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio, "speedup": self.speedup}

    def table(self) -> str:
        def pct(v):
            return "-" if v is None else f"{v:.1%}"

        rows = [("", "original", "compressed", "ratio"),
                ("size", _mb(self.original_bytes), _mb(self.compressed_bytes), f"{self.size_ratio:.3f}x"),
                ("latency", f"{self.original_ms:.3f} ms", f"{self.compressed_ms:.3f} ms",
                 f"{self.speedup:.2f}x faster"),
                ("accuracy", pct(self.accuracy_original), pct(self.accuracy_compressed), "")]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
        rel = "" if self.rel_error is None else f" (relative {self.rel_error:.2%})"
        lines.append(f"max abs error {self.max_abs_error:.3g}{rel}, top-1 agreement {pct(self.top1_agreement)} "
                     f"(latency: median of {self.repeats}, interleaved, {self.threads} thread(s))")
        return "\n".join(lines)

    __str__ = table


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _is_onnx_path(m) -> bool:
    return isinstance(m, (str, os.PathLike))


def _runner(func: str, arg: str, model, x: torch.Tensor, threads: int) -> tuple[Callable[[], object], int]:
    """(run, size): a zero-argument call giving the output as float64 numpy, and the size in bytes."""
    if isinstance(model, nn.Module):
        def run():
            with torch.inference_mode():
                return model(x)
        return run, state_dict_bytes(model)
    if _is_onnx_path(model):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise fail(func, arg, f"is {path!r}, which is not a file", FileNotFoundError)
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            sess = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise fail(func, arg, f"is {path!r}, which onnxruntime cannot load as an ONNX model "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy()}
        return (lambda: sess.run(None, feed)[0]), os.path.getsize(path)
    raise fail(func, arg, f"must be an nn.Module or the path of an ONNX file, got {type(model).__name__}",
               TypeError)


def _numpy(out) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


def compare(original, compressed, data, *, repeats: int = 20, warmup: int = 3, threads: int | None = None,
            clock: str = "wall") -> Comparison:
    """Compare a model with its compressed version: size on disk, latency, and output agreement.

    Args:
        original, compressed: each an nn.Module (run under torch.inference_mode) or the path of an ONNX
            file (run in onnxruntime on CPU, fed to its first input); they may differ in kind.
        data: the input batch (a Tensor), or (inputs, labels) to also get each model's accuracy.
        repeats: timed calls per model, alternating between the two (interleaved, so machine load
            hits both alike); latency is the median. warmup: untimed calls first.
        threads: torch and onnxruntime intra-op threads during the measurement (default: torch's
            current count).
        clock: "wall" (time.perf_counter) or "process" (time.process_time: CPU time of this process,
            which other processes on a busy machine do not inflate; meaningful with threads=1).

    Returns a Comparison (print it for the table; .to_dict()). max_abs_error, rel_error and top-1
    agreement compare the first output of each model on `data`. When `compressed` is an int8 ONNX file
    and rel_error is beyond what int8 should give (INT8_MAX_REL_ERROR, 5%: the bound quantize_onnx
    checks), a RuntimeWarning says so and names the usual causes (onnxruntime's u8s8 kernels saturating
    on an x86 CPU without VNNI; inputs beyond a static model's calibration range). Raises TypeError/ValueError for bad arguments.
    """
    labels = None
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise fail("compare", "data", "must be an input Tensor or a pair (inputs, labels) of Tensors", TypeError)
        data, labels = data
    if not isinstance(data, torch.Tensor):
        raise fail("compare", "data", f"must be an input Tensor or (inputs, labels), got {type(data).__name__}",
                   TypeError)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise fail("compare", "repeats", f"must be a positive int, got {repeats!r}")
    if clock not in ("wall", "process"):
        raise fail("compare", "clock", f"is {clock!r}; choose 'wall' or 'process'")
    now = time.perf_counter if clock == "wall" else time.process_time
    threads = torch.get_num_threads() if threads is None else threads
    run_a, size_a = _runner("compare", "original", original, data, threads)
    run_b, size_b = _runner("compare", "compressed", compressed, data, threads)
    times: tuple[list[float], list[float]] = ([], [])
    with num_threads(threads):
        out_a, out_b = _numpy(run_a()), _numpy(run_b())
        for _ in range(warmup):
            run_a(), run_b()
        for _ in range(repeats):
            for run, t in ((run_a, times[0]), (run_b, times[1])):
                t0 = now()
                run()
                t.append(now() - t0)
    if out_a.shape != out_b.shape:
        raise ValueError(f"torchfast.compress.compare: the models' outputs differ in shape: {out_a.shape} "
                         f"(original) and {out_b.shape} (compressed)")
    classes = out_a.ndim == 2 and out_a.shape[1] > 1
    top1 = float((out_a.argmax(1) == out_b.argmax(1)).mean()) if classes else None
    acc_a = acc_b = None
    if classes and labels is not None:
        y = labels.detach().cpu().numpy()
        acc_a, acc_b = float((out_a.argmax(1) == y).mean()), float((out_b.argmax(1) == y).mean())
    rel = rel_l2_error(out_a, out_b)
    if _is_onnx_path(compressed) and rel > INT8_MAX_REL_ERROR and _is_int8_onnx(os.fspath(compressed)):
        reduce_range, why = int8_settings()
        warnings.warn(f"torchfast.compress.compare: the int8 ONNX model {os.fspath(compressed)} is {rel:.1%} off "
                      f"(relative L2), beyond the {INT8_MAX_REL_ERROR:.0%} int8 should give. Causes: on an x86 CPU "
                      "without VNNI, onnxruntime's u8s8 kernels saturate unless weights are 7-bit (quantize_onnx "
                      f"picks reduce_range={reduce_range} on this CPU: {why}); for a static model, inputs outside "
                      "the calibration data's range are clipped", RuntimeWarning, stacklevel=2)
    return Comparison(
        original_bytes=size_a, compressed_bytes=size_b,
        original_ms=statistics.median(times[0]) * 1e3, compressed_ms=statistics.median(times[1]) * 1e3,
        max_abs_error=float(np.abs(out_a - out_b).max(initial=0.0)), top1_agreement=top1,
        accuracy_original=acc_a, accuracy_compressed=acc_b, threads=threads, repeats=repeats, rel_error=rel)


_INT8_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QLinearMatMul",
             "QLinearConv", "QuantizeLinear", "MatMulIntegerToFloat"}


def _is_int8_onnx(path: str) -> bool:
    """Whether the ONNX file holds quantized (integer) matmul / quantize ops."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:
        return False
    return any(node.op_type in _INT8_OPS for node in graph.node)
