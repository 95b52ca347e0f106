"""What the normalization ops (rms_norm, add_rms_norm, layer_norm) share: argument checks that every
implementation gets, the dtype rules of mixed-precision weights, the autocast rule, and the plumbing
of autograd through the per-row statistics.

A normalization works on rows: the last dimension of x (n elements), every leading dimension flattened.
The forward ops also return the per-row statistics (rstd, and mean for layer_norm) in fp32 (fp64 for
float64 x); backward ops take them instead of recomputing. The statistics are differentiable outputs
(d rstd / dx is folded into dx when a gradient reaches them), which is what makes the double backward
of the backward ops exact: it is the vector-Jacobian product of the reference backward, taken with the
statistics as independent inputs, and autograd routes the part that flows into them back to x.
"""

from __future__ import annotations

from typing import Callable

import torch

from torchfast.ops import _library

LOW = (torch.bfloat16, torch.float16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved statistics and of the math: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_eps(eps: float | None, x: torch.Tensor) -> float:
    """eps=None means the machine epsilon of the math type, like torch.nn.RMSNorm."""
    return torch.finfo(stats_dtype(x.dtype)).eps if eps is None else eps


def param_dtype_ok(p: torch.dtype, x: torch.dtype) -> bool:
    """A weight/bias has x's dtype or, for bf16/fp16 x, float32 (AMP master weights, used as they are)."""
    return p == x or (x in LOW and p == torch.float32)


def check_args(op: str, x: torch.Tensor, eps: float, params: dict[str, torch.Tensor | None],
               dtypes: bool = True) -> None:
    """The checks every implementation gets (the C++ kernels repeat them for direct op callers), with
    messages naming the op and the argument. Also run by the fake kernels, so compiled code agrees.
    Plain `if`s, not torch._check: Dynamo traces this (from the public functions) and cannot take a
    message closure over tensors; on symbolic shapes the comparisons become guards.
    dtypes=False skips the dtype rules: under autocast the op's autocast rule fixes dtypes first."""
    if not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"torchfast.{op}: eps must be a finite number >= 0 (it keeps 1/sqrt(variance + eps) "
                         f"finite); got {eps}")
    if x.dim() < 1:
        raise RuntimeError(f"torchfast.{op}: argument 'x' must have at least one dimension (the last one is "
                           "normalized); got a 0-d tensor")
    if x.shape[-1] == 0:
        raise RuntimeError(f"torchfast.{op}: argument 'x' has shape {tuple(x.shape)}: its last dimension is "
                           "empty, so there is nothing to normalize")
    for name, p in params.items():
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != x.shape[-1]:
            raise RuntimeError(
                f"torchfast.{op}: argument '{name}' has shape {tuple(p.shape)} but x's last dimension has "
                f"size {x.shape[-1]}; '{name}' must be 1-D with {x.shape[-1]} elements"
            )
        if dtypes and not param_dtype_ok(p.dtype, x.dtype):
            raise TypeError(
                f"torchfast.{op}: argument '{name}' has dtype {p.dtype} but 'x' has dtype {x.dtype}; "
                f"'{name}' must have x's dtype, or float32 when x is bfloat16 or float16"
            )
    given = [(name, p) for name, p in params.items() if p is not None]
    if dtypes and len(given) == 2 and given[0][1].dtype != given[1][1].dtype:
        (a, pa), (b, pb) = given
        raise TypeError(f"torchfast.{op}: '{a}' has dtype {pa.dtype} but '{b}' has dtype {pb.dtype}; they must match")


def check_public_args(op: str, x: torch.Tensor, eps: float, params: dict[str, torch.Tensor | None]) -> None:
    """check_args for the public functions, which run above autocast."""
    dev = x.device.type
    autocast = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
    check_args(op, x, eps, params, dtypes=not autocast)


def empty_stats(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=stats_dtype(x.dtype))


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels' output layout: contiguous, whatever x's layout."""
    return x.new_empty(x.shape)


# ---- autocast ----------------------------------------------------------------------------------

def autocast_params(x_dtype: torch.dtype, *params: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Under autocast, weights are used as they are when the kernels accept them (x's dtype, or fp32
    for bf16/fp16 x: no cast of an fp32 weight to low precision, no upcast copy of x). A weight the
    kernels would refuse (say bf16 weights with fp32 x) is cast to the math type, which costs a copy of
    a vector, never of x. weight and bias end up with one dtype, as the kernels read both as one type."""
    target = torch.float32 if x_dtype in LOW else x_dtype
    out = [p if p is None or param_dtype_ok(p.dtype, x_dtype) else p.to(target) for p in params]
    present = {p.dtype for p in out if p is not None}
    if len(present) > 1:
        out = [p if p is None else p.to(target) for p in out]
    return out


def register_autocast(qualname: str, adjust: Callable[..., tuple]) -> None:
    """Autocast rule of a normalization op: no cast of the activations (the kernels compute in fp32
    and return x's dtype, so an upcast copy of x would only double the memory traffic), and
    `adjust(*args)` fixes what the kernels would otherwise refuse (see autocast_params). Registered for
    AutocastCPU and AutocastCUDA; the op then runs below autocast, which is not re-applied."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name)
    lib = _library._lib("IMPL")
    for key in ("AutocastCPU", "AutocastCUDA"):
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _excluded=excluded):
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op(*adjust(*args))

        lib.impl(name, kernel, key, with_keyset=True)


# ---- autograd ----------------------------------------------------------------------------------

def rstd_grad_term(grad_rstd: torch.Tensor, rstd: torch.Tensor, centered: torch.Tensor) -> torch.Tensor:
    """dL/dx from a gradient reaching rstd: with rstd = (mean(c^2) + eps)^(-1/2) and c = x (RMSNorm) or
    x - mean(x) (LayerNorm), d rstd / dx_j = -rstd^3 c_j / n (the mean's own term sums to zero)."""
    n = centered.shape[-1]
    coef = (-grad_rstd * rstd.pow(3) / n).unsqueeze(-1)
    return coef * centered.to(coef.dtype)


def add_grad(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if b is None:
        return a
    b = b.to(dtype)
    return b if a is None else a + b


def vjp_backward(reference_backward: Callable, saved: tuple, cotangents: tuple) -> tuple:
    """Double backward of a `*_backward` op: the vector-Jacobian product of its differentiable
    reference at the saved inputs, through torch.func so it is itself differentiable. Inputs that are
    None (no weight...) get None; cotangents that are None count as zeros."""
    idx = [i for i, t in enumerate(saved) if t is not None]
    present: list[int] = []  # which outputs of the reference exist (dw is None without a weight)

    def fn(*tensors):
        args = list(saved)
        for i, t in zip(idx, tensors):
            args[i] = t
        outs = reference_backward(*args)
        present[:] = [i for i, o in enumerate(outs) if o is not None]
        return tuple(outs[i] for i in present)

    outs, vjp_fn = torch.func.vjp(fn, *(saved[i] for i in idx))
    cts = tuple(torch.zeros_like(o) if cotangents[i] is None else cotangents[i].to(o.dtype)
                for i, o in zip(present, outs))
    grads = vjp_fn(cts)
    result = [None] * len(saved)
    for i, g in zip(idx, grads):
        result[i] = g
    return tuple(result)


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
