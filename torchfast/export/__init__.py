"""Exporting models that use torchfast ops: ONNX (both torch exporters), TorchScript, torch.export.

    torchfast.export.onnx(model, (x,), "model.onnx")           # export, check, verify in onnxruntime
    torch.onnx.export(model, (x,), "m.onnx", dynamo=True,      # or call torch's exporter yourself
                      custom_translation_table=torchfast.export.onnx_translation_table())
    torch.onnx.export(model, (x,), "m.onnx", dynamo=False)     # symbolics registered by import torchfast

TorchScript (`torch.jit.script` / `torch.jit.trace`) and `torch.export.export` need nothing from here:
the ops are dispatcher operators with schemas and fake kernels, so those tools see `torchfast::<op>`
nodes; a saved TorchScript or ExportedProgram file loads in any process that has imported torchfast.

Every op takes part through its registry entry (`OpSpec.onnx_translations` / `onnx_symbolics`, see
torchfast/export/_tables.py); nothing here names an op.
"""

from torchfast.export._onnx import (
    MIN_OPSET,
    OnnxExport,
    OnnxVerificationError,
    onnx,
)
from torchfast.export._tables import DEFAULT_OPSET, onnx_translation_table

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "OnnxExport", "OnnxVerificationError", "onnx",
           "onnx_translation_table"]
