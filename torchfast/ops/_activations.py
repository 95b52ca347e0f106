"""The activations of bias_act and the gated units as standard ONNX ops, for both exporters.

Their math (values, first and second derivatives, argument checks) lives in
torchfast/reference/_activations.py, below both the op modules and the Triton operators; it is
re-exported here for the code that imports it from this module.
"""

from __future__ import annotations

import math

import torch

from torchfast.reference._activations import BETA, KAPPA
from torchfast.reference._activations import (  # noqa: F401  (re-exported)
    ACTS,
    GATED,
    act_fn,
    act_grad,
    act_grad2,
    check_act,
    compute_dtype,
    gelu_act,
)


# Gelu (with `approximate`) exists from opset 20, Swish from 24; below, the formulas of
# torchfast/reference/_activations.py are spelled out with Erf / Tanh / Sigmoid, Mul and Add. Constants
# take the input's float type (CastLike for the dynamo exporter, the traced scalar type for the
# TorchScript one), so float16 models stay float16.

ONNX_OPSETS = (18, 20, 24)  # dynamo: first opsets at which the translation changes
LEGACY_OPSETS = (9, 20)  # TorchScript exporter (its newest opset is 20)


def onnx_act(op, x, act: str, opset: int):
    """act(x) with onnxscript ops `op` of `opset` (torch.onnx.export(dynamo=True) translations)."""
    if act == "identity":
        return op.Identity(x)
    if act == "relu":
        return op.Relu(x)
    if act == "swish":
        return op.Swish(x, alpha=1.0) if opset >= 24 else op.Mul(x, op.Sigmoid(x))
    approximate = "none" if act == "gelu" else "tanh"
    if opset >= 20:
        return op.Gelu(x, approximate=approximate)

    def c(value):
        return op.CastLike(value, x)

    if act == "gelu":
        inner = op.Erf(op.Mul(x, c(1 / math.sqrt(2))))
    else:
        inner = op.Tanh(op.Mul(op.Add(x, op.Mul(c(KAPPA), op.Mul(x, op.Mul(x, x)))), c(BETA)))
    return op.Mul(op.Mul(x, c(0.5)), op.Add(inner, c(1.0)))


_JIT_DTYPES = {
    "Float": torch.float32,
    "Half": torch.float16,
    "Double": torch.float64,
    "BFloat16": torch.bfloat16,
}


def legacy_const(g, value: float, like):
    """A scalar constant of `like`'s float type, in a TorchScript-exporter graph."""
    scalar_type = like.type().scalarType() if hasattr(like.type(), "scalarType") else None
    return g.op("Constant", value_t=torch.tensor(value, dtype=_JIT_DTYPES.get(scalar_type, torch.float32)))


def legacy_act(g, x, act: str, opset: int):
    """act(x) in a torch.onnx.export(dynamo=False) symbolic (opsets 9..20)."""
    if act == "identity":
        return g.op("Identity", x)
    if act == "relu":
        return g.op("Relu", x)
    if act == "swish":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if opset >= 20:
        return g.op("Gelu", x, approximate_s="none" if act == "gelu" else "tanh")
    if act == "gelu":
        inner = g.op("Erf", g.op("Mul", x, legacy_const(g, 1 / math.sqrt(2), x)))
    else:
        cube = g.op("Mul", x, g.op("Mul", x, x))
        poly = g.op("Add", x, g.op("Mul", legacy_const(g, KAPPA, x), cube))
        inner = g.op("Tanh", g.op("Mul", poly, legacy_const(g, BETA, x)))
    half_x = g.op("Mul", x, legacy_const(g, 0.5, x))
    return g.op("Mul", half_x, g.op("Add", inner, legacy_const(g, 1.0, x)))
