"""ONNX translations shared by the normalization ops (rms_norm, add_rms_norm, layer_norm), for both
exporters.

Their math, argument checks, dtype rules, autocast rule and autograd plumbing live in
torchfast/reference/_norm.py, below both the op modules and the Triton operators; they are
re-exported here, so the op modules reach both halves as `_norm.<name>`.
"""

from __future__ import annotations

import torch

from torchfast.reference._norm import (  # noqa: F401  (re-exported)
    LOW,
    add_grad,
    autocast_params,
    check_args,
    check_public_args,
    empty_stats,
    param_dtype_ok,
    register_autocast,
    resolve_eps,
    rows_contiguous,
    rstd_grad_term,
    stats_dtype,
    vjp_backward,
)


# ---- ONNX ---------------------------------------------------------------------------------------
# Standard-domain ops only. The dynamo exporter's translations get onnx_ir Values (with .dtype) and the
# op's float arguments as Python floats; the TorchScript exporter's symbolics get torch._C.Values.
# Statistics and math run in float32 (float64 for double), as in the kernels, so the low-precision
# activations are cast up once and the result cast back once.

def onnx_math_type(x_dtype):
    """(onnx_ir DataType of the math, whether x must be cast to it)."""
    from onnx_ir import DataType

    low = x_dtype in (DataType.BFLOAT16, DataType.FLOAT16)
    return (DataType.FLOAT if low else x_dtype), low


def onnx_rms_stats(op, xf, eps: float):
    """rstd = 1 / sqrt(mean(xf^2, -1) + eps), keeping the last axis (size 1); xf in the math type."""
    axes = op.Constant(value_ints=[-1])
    ms = op.ReduceMean(op.Mul(xf, xf), axes, keepdims=1)
    return op.Reciprocal(op.Sqrt(op.Add(ms, op.CastLike(op.Constant(value_float=eps), ms))))


def onnx_rms_norm_decomposed(op, x, weight, eps: float, dtype=None):
    """(y, rstd) of rms_norm from elementary ops (any opset >= 18). dtype: x's onnx_ir DataType, for an
    x computed inside the translation (whose dtype the tracer does not know)."""
    dtype = x.dtype if dtype is None else dtype
    math, low = onnx_math_type(dtype)
    xf = op.Cast(x, to=math) if low else x
    rstd = onnx_rms_stats(op, xf, eps)
    y = op.Mul(xf, rstd)
    if weight is not None:
        y = op.Mul(y, op.Cast(weight, to=math) if weight.dtype != math else weight)
    if low:
        y = op.Cast(y, to=dtype)
    return y, op.Squeeze(rstd, op.Constant(value_ints=[-1]))


def onnx_rms_norm_23(op, x, weight, eps: float, dtype=None):
    """(y, rstd) of rms_norm with RMSNormalization (opset 23) for float32/bf16/fp16 activations. rstd
    comes from the decomposition: graphs of inference models drop it unused."""
    import onnx_ir as ir

    dtype = x.dtype if dtype is None else dtype
    math, low = onnx_math_type(dtype)
    if dtype == ir.DataType.DOUBLE:  # RMSNormalization stashes float32 statistics: not exact
        return onnx_rms_norm_decomposed(op, x, weight, eps, dtype)
    xf = op.Cast(x, to=math) if low else x
    if weight is None:
        y = op.RMSNormalization(x, op.ConstantOfShape(op.Shape(x, start=-1), value=ir.tensor([1.0], dtype=dtype)),
                                axis=-1, epsilon=eps, stash_type=1)
    elif weight.dtype == dtype:
        y = op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)
    else:  # fp32 weight on bf16/fp16 x: normalize x cast up (exactly the kernels' fp32 math), cast back
        y = op.Cast(op.RMSNormalization(xf, weight, axis=-1, epsilon=eps, stash_type=1), to=dtype)
    return y, op.Squeeze(onnx_rms_stats(op, xf, eps), op.Constant(value_ints=[-1]))


# TorchScript exporter (opsets 9..20): ReduceMean takes its axes as an attribute before opset 18 and
# Squeeze before opset 13.

def ts_reduce_mean_last(g, x):
    if g.opset >= 18:
        return g.op("ReduceMean", x, g.op("Constant", value_t=torch.tensor([-1])), keepdims_i=1)
    return g.op("ReduceMean", x, axes_i=[-1], keepdims_i=1)


def ts_squeeze_last(g, x):
    if g.opset >= 13:
        return g.op("Squeeze", x, g.op("Constant", value_t=torch.tensor([-1])))
    return g.op("Squeeze", x, axes_i=[-1])


def ts_scalar_type(v):
    from torch.onnx._internal.torchscript_exporter import _type_utils

    return _type_utils.JitScalarType.from_value(v)


def ts_cast(g, v, scalar_type):
    return g.op("Cast", v, to_i=scalar_type.onnx_type())


def ts_math_type(t):
    from torch.onnx._internal.torchscript_exporter import _type_utils

    low = t in (_type_utils.JitScalarType.BFLOAT16, _type_utils.JitScalarType.HALF)
    return _type_utils.JitScalarType.FLOAT if low else t


def ts_math(g, x):
    """(x in the math type, x's scalar type, whether it was cast)."""
    t = ts_scalar_type(x)
    low = ts_math_type(t) != t
    return (ts_cast(g, x, ts_math_type(t)) if low else x), t, low


def ts_is_none(v) -> bool:
    return v is None or v.node().mustBeNone()


def ts_rms_norm(g, x, weight, eps: float):
    """(y, rstd) of rms_norm in the TorchScript exporter's graph."""
    xf, t, low = ts_math(g, x)
    ms = ts_reduce_mean_last(g, g.op("Mul", xf, xf))
    eps_c = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float64 if t.dtype() == torch.float64
                                                     else torch.float32))
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, eps_c)))
    y = g.op("Mul", xf, rstd)
    if not ts_is_none(weight):
        y = g.op("Mul", y, ts_cast(g, weight, ts_math_type(t)))
    if low:
        y = ts_cast(g, y, t)
    return y, ts_squeeze_last(g, rstd)


def onnx_layer_norm_decomposed(op, x, weight, bias, eps: float):
    """(y, mean, rstd) of layer_norm from elementary ops; used for float64 (LayerNormalization stashes
    float32 statistics)."""
    math, low = onnx_math_type(x.dtype)
    xf = op.Cast(x, to=math) if low else x
    axes = op.Constant(value_ints=[-1])
    mean = op.ReduceMean(xf, axes, keepdims=1)
    xc = op.Sub(xf, mean)
    var = op.ReduceMean(op.Mul(xc, xc), axes, keepdims=1)
    rstd = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), var))))
    y = op.Mul(xc, rstd)
    if weight is not None:
        y = op.Mul(y, op.Cast(weight, to=math) if weight.dtype != math else weight)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=math) if bias.dtype != math else bias)
    if low:
        y = op.Cast(y, to=x.dtype)
    return y, op.Squeeze(mean, axes), op.Squeeze(rstd, axes)


def onnx_layer_norm_17(op, x, weight, bias, eps: float):
    """(y, mean, rstd) of layer_norm with LayerNormalization (opset 17), which wants X, Scale and B in
    one dtype: fp32 parameters on low-precision x run it in float32 on x cast up, then cast back."""
    import onnx_ir as ir

    if x.dtype == ir.DataType.DOUBLE:
        return onnx_layer_norm_decomposed(op, x, weight, bias, eps)
    params = [p for p in (weight, bias) if p is not None]
    dt = params[0].dtype if params else x.dtype
    xc = op.Cast(x, to=dt) if dt != x.dtype else x
    scale = weight
    if scale is None:
        scale = op.ConstantOfShape(op.Shape(x, start=-1), value=ir.tensor([1.0], dtype=dt))
    y, mean, rstd = op.LayerNormalization(xc, scale, bias, axis=-1, epsilon=eps, stash_type=1, _outputs=3)
    if dt != x.dtype:
        y = op.Cast(y, to=x.dtype)
    axes = op.Constant(value_ints=[-1])
    return y, op.Squeeze(mean, axes), op.Squeeze(rstd, axes)


def ts_layer_norm(g, x, weight, bias, eps: float):
    """(y, mean, rstd) of layer_norm in the TorchScript exporter's graph: LayerNormalization from opset
    17 (float32 math), elementary ops below."""
    xf, t, low = ts_math(g, x)
    math = ts_math_type(t)
    eps_dtype = torch.float64 if t.dtype() == torch.float64 else torch.float32
    if g.opset >= 17 and t.dtype() != torch.float64:
        one = g.op("Constant", value_t=torch.ones(1, dtype=math.dtype()))
        scale = ts_cast(g, weight, math) if not ts_is_none(weight) else g.op(
            "Expand", one, g.op("Shape", x, start_i=-1))
        inputs = [xf, scale] + ([ts_cast(g, bias, math)] if not ts_is_none(bias) else [])
        y, mean, rstd = g.op("LayerNormalization", *inputs, axis_i=-1, epsilon_f=eps, stash_type_i=1, outputs=3)
    else:
        mean = ts_reduce_mean_last(g, xf)
        xc = g.op("Sub", xf, mean)
        var = ts_reduce_mean_last(g, g.op("Mul", xc, xc))
        eps_c = g.op("Constant", value_t=torch.tensor(eps, dtype=eps_dtype))
        rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps_c)))
        y = g.op("Mul", xc, rstd)
        if not ts_is_none(weight):
            y = g.op("Mul", y, ts_cast(g, weight, math))
        if not ts_is_none(bias):
            y = g.op("Add", y, ts_cast(g, bias, math))
    if low:
        y = ts_cast(g, y, t)
    return y, ts_squeeze_last(g, mean), ts_squeeze_last(g, rstd)
