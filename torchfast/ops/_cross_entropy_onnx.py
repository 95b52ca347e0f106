"""ONNX translations of cross_entropy and linear_cross_entropy, for both torch exporters.

Standard-domain ops only, math in float32 (float64 for float64), as in the kernels: bf16/fp16 logits
are cast up once. The formula is torchfast/reference/cross_entropy.py's:

    s    = c * tanh(x / c)                                    (softcap: Tanh)
    lse  = max(s) + log(sum(exp(s - max(s))))                 (ReduceMax, Exp, ReduceSum, Log)
    loss = lse - (1 - eps) * s[t] - eps * mean(s) + z * lse^2 (GatherElements, ReduceMean)
    loss = 0 where t == ignore_index                          (Where; t replaced by 0 before gathering)

The log-sum-exp is spelled out rather than ReduceLogSumExp, whose stability the ONNX spec leaves to the
runtime; the explicit max also gives the kernels' NaN for a row holding a +inf logit. Plain 2-D logits
with no label smoothing, z-loss or softcap use SoftmaxCrossEntropyLoss (reduction "none",
ignore_index), which runtimes implement as one kernel; lse then comes from the formula above, and
graphs that only use the loss drop it.

linear_cross_entropy is MatMul(hidden, weight^T) (+ bias) followed by the same, then its reduction (the
mean divides by the number of non-ignored targets, NaN when there are none, as the op). Its three
gradient outputs are empty [0] tensors: exported inference graphs never use them, and the public
function passes grad_mask all False outside of training.

The dynamo exporter's translations get onnx_ir Values and the op's options as Python values; the
TorchScript exporter's symbolics get torch._C.Values; they serve opsets 9 to 20 (SoftmaxCrossEntropyLoss
from 12, GatherElements from 11, OneHot + Where below). Nothing here imports onnx or onnxscript at import
time.
"""

from __future__ import annotations

import torch

from torchfast.export._tables import onnx_opset
from torchfast.ops._norm import onnx_math_type, ts_cast, ts_math_type, ts_scalar_type

OPSET = 18  # dynamo: the one translation serves every opset this exporter supports
LEGACY_OPSET = 9


def _plain(shape, label_smoothing: float, z_loss: float, softcap) -> bool:
    """Whether SoftmaxCrossEntropyLoss computes exactly this loss: [N, C] logits, no extras."""
    return shape is not None and len(shape) == 2 and not label_smoothing and not z_loss and softcap is None


# ---- dynamo exporter (onnxscript ops) ---------------------------------------------------------------

def _const(op, value: float, math):
    import onnx_ir as ir

    return op.Constant(value=ir.tensor(value, dtype=math))


def _rows(op, x, target, dtype, shape, ignore_index: int, label_smoothing: float, z_loss: float, softcap):
    """(per-row loss, lse) in the math type from logits x of onnx_ir dtype `dtype` and `shape`."""
    math, low = onnx_math_type(dtype)
    xf = op.Cast(x, to=math) if low else x
    s = xf
    if softcap is not None:
        c = _const(op, softcap, math)
        s = op.Mul(op.Tanh(op.Div(xf, c)), c)
    last = op.Constant(value_ints=[-1])
    m = op.ReduceMax(s, last, keepdims=1)
    lse_k = op.Add(op.Log(op.ReduceSum(op.Exp(op.Sub(s, m)), last, keepdims=1)), m)
    lse = op.Squeeze(lse_k, last)
    if _plain(shape, label_smoothing, z_loss, softcap):
        # The tracer gives the node both outputs (log_prob unused): take the loss.
        loss = op.SoftmaxCrossEntropyLoss(xf, target, reduction="none", ignore_index=ignore_index)
        return (loss[0] if isinstance(loss, tuple) else loss), lse
    valid = op.Not(op.Equal(target, op.CastLike(op.Constant(value_int=ignore_index), target)))
    t = op.Where(valid, target, op.CastLike(op.Constant(value_int=0), target))
    st = op.Squeeze(op.GatherElements(s, op.Unsqueeze(t, last), axis=-1), last)
    loss = op.Sub(lse, op.Mul(_const(op, 1.0 - label_smoothing, math), st) if label_smoothing else st)
    if label_smoothing:
        loss = op.Sub(loss, op.Mul(_const(op, label_smoothing, math), op.ReduceMean(s, last, keepdims=0)))
    if z_loss:
        loss = op.Add(loss, op.Mul(_const(op, z_loss, math), op.Mul(lse, lse)))
    return op.Where(valid, loss, _const(op, 0.0, math)), lse


def cross_entropy_onnx(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    op = onnx_opset(OPSET)
    return _rows(op, logits, target, logits.dtype, logits.shape, ignore_index, label_smoothing, z_loss,
                 softcap)


def _empty(op, like):
    """A [0] tensor of like's dtype (an unused gradient output)."""
    shape = op.Constant(value_ints=[0])
    return op.CastLike(op.ConstantOfShape(shape), like)


def linear_cross_entropy_onnx(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                              label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=4096, grad_mask=None):
    op = onnx_opset(OPSET)
    logits = op.MatMul(hidden, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        logits = op.Add(logits, bias)
    rows, lse = _rows(op, logits, target, hidden.dtype, hidden.shape, ignore_index, label_smoothing, z_loss,
                      softcap)
    loss = rows
    if reduction != "none":
        loss = op.ReduceSum(rows, keepdims=0)
        if reduction == "mean":
            valid = op.Not(op.Equal(target, op.CastLike(op.Constant(value_int=ignore_index), target)))
            loss = op.Div(loss, op.ReduceSum(op.CastLike(valid, loss), keepdims=0))
    return loss, lse, _empty(op, hidden), _empty(op, weight), _empty(op, hidden if bias is None else bias)


# ---- TorchScript exporter (torch._C graph) ----------------------------------------------------------

def _ts_const(g, value, dtype: torch.dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _ts_reduce(g, name: str, x, keepdims: int, axes=(-1,)):
    """Reduce over `axes` (None: all). ReduceSum takes its axes as an input from opset 13, the others
    from 18."""
    if axes is None:
        return g.op(name, x, keepdims_i=keepdims)
    if g.opset >= (13 if name == "ReduceSum" else 18):
        return g.op(name, x, _ts_const(g, list(axes), torch.int64), keepdims_i=keepdims)
    return g.op(name, x, axes_i=list(axes), keepdims_i=keepdims)


def _ts_valid(g, target, ignore_index: int):
    return g.op("Not", g.op("Equal", target, _ts_const(g, ignore_index, ts_scalar_type(target).dtype())))


def _ts_rows(g, x, x_type, rank, target, ignore_index: int, label_smoothing: float, z_loss: float, softcap):
    """(per-row loss, lse) in the math type from logits x of JitScalarType x_type and rank (None if
    unknown)."""
    math_type = ts_math_type(x_type)
    xf = ts_cast(g, x, math_type) if math_type != x_type else x
    math = math_type.dtype()
    # Negative axes arrived in opset 11 (older Squeeze shape inference gets them wrong).
    last = (-1,) if g.opset >= 11 or rank is None else (rank - 1,)
    s = xf
    if softcap is not None:
        c = _ts_const(g, softcap, math)
        s = g.op("Mul", g.op("Tanh", g.op("Div", xf, c)), c)
    m = _ts_reduce(g, "ReduceMax", s, 1, last)
    sum_exp = _ts_reduce(g, "ReduceSum", g.op("Exp", g.op("Sub", s, m)), 1, last)
    lse = _ts_squeeze(g, g.op("Add", g.op("Log", sum_exp), m), last)
    if g.opset >= 12 and _plain(None if rank is None else [None] * rank, label_smoothing, z_loss, softcap):
        loss = g.op("SoftmaxCrossEntropyLoss", xf, target, reduction_s="none", ignore_index_i=ignore_index)
        return loss, lse
    valid = _ts_valid(g, target, ignore_index)
    t = g.op("Where", valid, target, _ts_const(g, 0, ts_scalar_type(target).dtype()))
    st = _ts_pick(g, s, t, math, last)
    if label_smoothing:
        st = g.op("Mul", _ts_const(g, 1.0 - label_smoothing, math), st)
    loss = g.op("Sub", lse, st)
    if label_smoothing:
        mean = _ts_reduce(g, "ReduceMean", s, 0, last)
        loss = g.op("Sub", loss, g.op("Mul", _ts_const(g, label_smoothing, math), mean))
    if z_loss:
        loss = g.op("Add", loss, g.op("Mul", _ts_const(g, z_loss, math), g.op("Mul", lse, lse)))
    return g.op("Where", valid, loss, _ts_const(g, 0.0, math)), lse


def _ts_squeeze(g, x, axes, op="Squeeze"):
    """Squeeze (or Unsqueeze) `axes`: an input from opset 13, an attribute before."""
    if g.opset >= 13:
        return g.op(op, x, _ts_const(g, list(axes), torch.int64))
    return g.op(op, x, axes_i=list(axes))


def _ts_pick(g, s, t, math: torch.dtype, last):
    """s[..., t]: GatherElements from opset 11; below, the sum of s where OneHot(t) (a Where, not a
    product, so that a -inf logit elsewhere in the row gives no NaN)."""
    if g.opset >= 11:
        idx = _ts_squeeze(g, t, last, op="Unsqueeze")
        return _ts_squeeze(g, g.op("GatherElements", s, idx, axis_i=last[0]), last)
    depth = g.op("Gather", g.op("Shape", s), _ts_const(g, last[0], torch.int64), axis_i=0)  # a scalar
    # int64 indices and float values: the type combination onnxruntime's OneHot kernels take.
    values = _ts_const(g, [0.0, 1.0], torch.float32)
    hot = g.op("OneHot", _ts_cast_to(g, t, torch.int64), depth, values, axis_i=last[0])
    hot = _ts_cast_to(g, hot, torch.bool)
    return _ts_reduce(g, "ReduceSum", g.op("Where", hot, s, _ts_const(g, 0.0, math)), 0, last)


def _ts_cast_to(g, v, dtype: torch.dtype):
    from torch.onnx._internal.torchscript_exporter import _type_utils

    return ts_cast(g, v, _type_utils.JitScalarType.from_dtype(dtype))


def _ts_options(ignore_index, label_smoothing, z_loss, softcap):
    from torch.onnx import symbolic_helper as sh

    softcap = None if sh._is_none(softcap) else sh._maybe_get_const(softcap, "f")
    return (sh._maybe_get_const(ignore_index, "i"), sh._maybe_get_const(label_smoothing, "f"),
            sh._maybe_get_const(z_loss, "f"), softcap)


def cross_entropy_symbolic(g, logits, target, ignore_index, label_smoothing, z_loss, softcap):
    from torch.onnx import symbolic_helper as sh

    return _ts_rows(g, logits, ts_scalar_type(logits), sh._get_tensor_rank(logits), target,
                    *_ts_options(ignore_index, label_smoothing, z_loss, softcap))


def linear_cross_entropy_symbolic(g, hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                                  z_loss, softcap, chunk_size, grad_mask):
    from torch.onnx import symbolic_helper as sh

    opts = _ts_options(ignore_index, label_smoothing, z_loss, softcap)
    reduction = sh._maybe_get_const(reduction, "s")
    logits = g.op("MatMul", hidden, g.op("Transpose", weight, perm_i=[1, 0]))
    if not sh._is_none(bias):
        logits = g.op("Add", logits, bias)
    rows, lse = _ts_rows(g, logits, ts_scalar_type(hidden), sh._get_tensor_rank(hidden), target, *opts)
    loss = rows
    if reduction != "none":
        loss = _ts_reduce(g, "ReduceSum", rows, 0, axes=None)
        if reduction == "mean":
            valid = ts_cast(g, _ts_valid(g, target, opts[0]), ts_math_type(ts_scalar_type(hidden)))
            count = _ts_reduce(g, "ReduceSum", valid, 0, axes=None)
            loss = g.op("Div", loss, count)
    empty = [g.op("Constant", value_t=torch.empty(0, dtype=ts_scalar_type(v).dtype()))
             for v in (hidden, weight, hidden if sh._is_none(bias) else bias)]
    return (loss, lse, *empty)

