"""Compression: pruning that shrinks, quantization for PyTorch and ONNX, and a comparison of the results.

    pruned = torchfast.compress.prune(model, 0.5, method="ln_structured")   # a copy; model unchanged
    print(torchfast.compress.sparsity_report(pruned))
    small = torchfast.compress.shrink(pruned)        # hidden units removed: smaller, faster, same outputs
    q = torchfast.compress.quantize(model, mode="int8_dynamic")             # torchao quantize_
    torchfast.compress.quantize_onnx("model.onnx", "model.int8.onnx")      # onnxruntime.quantization
    print(torchfast.compress.compare(model, small, x))                      # size, latency, agreement
"""

from torchfast.compress._compare import Comparison, compare
from torchfast.compress._demo import demo_stage
from torchfast.compress._onnx import ONNX_MODES, QuantizedOnnx, quantize_onnx
from torchfast.compress._prune import METHODS, SCOPES, SparsityReport, prune, sparsity_report
from torchfast.compress._quantize import MODES, STATIC_BACKENDS, quantize, quantize_static
from torchfast.compress._shrink import shrink

__all__ = ["METHODS", "MODES", "ONNX_MODES", "SCOPES", "STATIC_BACKENDS", "Comparison", "QuantizedOnnx",
           "SparsityReport", "compare", "demo_stage", "prune", "quantize", "quantize_onnx", "quantize_static", "shrink",
           "sparsity_report"]
