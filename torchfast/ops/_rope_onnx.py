"""ONNX translations of rope, for both torch exporters.

Standard ops (every opset): per tensor x of rank n with R = cos.shape[-1] rotated features,

    xr   = x[..., :R]                                    (Slice; x itself when R = D)
    rot  = Reshape(Concat(-odd, even), x's shape)        rotate-half: Concat(-x[R/2:R], x[:R/2])
           with (even, odd) the two columns of Reshape(xr, [..., R/2, 2])    (interleaved; no Slice steps,
           so opset 9 works too)
    out  = Concat(xr * cu + rot * su, x[..., R:])        cu, su = Unsqueeze(cos / sin, unsqueeze_dim)

in float32 for bfloat16/float16 x (cast in, cast back once, as the kernels round once), in x's type
otherwise.

From opset 23 the dynamo translation uses ONNX's RotaryEmbedding where it applies: q/k of rank 4 and cos/sin
of rank 3, with unsqueeze_dim 1 ([B, H, T, D]: X as it is) or 2 ([B, T, H, D]: X reshaped to
[B, T, H * D], num_heads = H). RotaryEmbedding takes cos/sin of width R/2, one angle per pair, so the
translation passes cos[..., :R/2] (cos[..., 0::2] interleaved): that is the op's result exactly when, as
in every RoPE cache, the two members of a pair share their angle; for other cos/sin use an opset below 23
(torchfast.export verifies the exported model in onnxruntime and says so when it differs). Its cos/sin
get x's batch size by Expand (onnxruntime 1.32 does not broadcast a batch of 1), and bf16/fp16 x is cast
to float32 around it when cos/sin are float32. Other shapes use the standard ops at every opset.
Shapes must be known at export for R and the head dimension (they are, for any traced model); batch and
sequence may be dynamic.
"""

from __future__ import annotations

OPSET = 18  # dynamo: standard ops
ROTARY_OPSET = 23  # dynamo: RotaryEmbedding where it applies
LEGACY_OPSET = 9


def _position(unsqueeze_dim: int, cos_rank: int) -> int:
    return unsqueeze_dim + cos_rank + 1 if unsqueeze_dim < 0 else unsqueeze_dim


def _static(shape, what: str) -> list[int]:
    if shape is None:
        dims = None
    else:
        dims = [d if isinstance(d, int) else getattr(d, "value", None) for d in shape]
    if dims is None or any(not isinstance(d, int) for d in dims[-1:]):
        raise RuntimeError(f"torchfast.rope ONNX export: the last dimension of '{what}' must be known at "
                           f"export (got shape {shape})")
    return dims


def _pair_shape(rank: int, r: int, split: bool = True) -> list[int]:
    """Reshape targets [..., R/2, 2] (split) and back to [..., R]: 0 keeps a leading dimension, -1 takes
    the one before the features (the TorchScript exporter's shape inference needs one -1)."""
    return [0] * (rank - 2) + [-1] + ([r // 2, 2] if split else [r])


# ---- dynamo exporter (onnxscript ops) ---------------------------------------------------------------

def _ints(op, values):
    return op.Constant(value_ints=list(values))


def _rotate(op, xr, rank: int, r: int, interleaved: bool):
    last = _ints(op, [-1])
    if not interleaved:
        h = r // 2
        x1 = op.Slice(xr, _ints(op, [0]), _ints(op, [h]), last)
        x2 = op.Slice(xr, _ints(op, [h]), _ints(op, [r]), last)
        return op.Concat(op.Neg(x2), x1, axis=-1)
    pairs = op.Reshape(xr, _ints(op, _pair_shape(rank, r)))
    even = op.Slice(pairs, _ints(op, [0]), _ints(op, [1]), last)
    odd = op.Slice(pairs, _ints(op, [1]), _ints(op, [2]), last)
    return op.Reshape(op.Concat(op.Neg(odd), even, axis=-1), _ints(op, _pair_shape(rank, r, False)))


def _standard(op, x, cu, su, r: int, interleaved: bool):
    from torchfast.ops._norm import onnx_math_type

    dims = _static(x.shape, "q/k")
    rank, d = len(dims), dims[-1]
    math, low = onnx_math_type(x.dtype)
    xr = x if r == d else op.Slice(x, _ints(op, [0]), _ints(op, [r]), _ints(op, [-1]))
    xf = op.Cast(xr, to=math) if low else xr
    out = op.Add(op.Mul(xf, cu), op.Mul(_rotate(op, xf, rank, r, interleaved), su))
    if low:
        out = op.Cast(out, to=x.dtype)
    if r < d:
        out = op.Concat(out, op.Slice(x, _ints(op, [r]), _ints(op, [d]), _ints(op, [-1])), axis=-1)
    return out


def _cos_sin(op, cos, sin, x, p: int):
    """cos/sin unsqueezed, in the math type of x."""
    from torchfast.ops._norm import onnx_math_type

    math, _ = onnx_math_type(x.dtype)
    axes = _ints(op, [p])
    cu, su = op.Unsqueeze(cos, axes), op.Unsqueeze(sin, axes)
    if cos.dtype != math:
        cu, su = op.Cast(cu, to=math), op.Cast(su, to=math)
    return cu, su


def rope_onnx(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    from torchfast.export._tables import onnx_opset

    op = onnx_opset(OPSET)
    r = _static(cos.shape, "cos")[-1]
    p = _position(unsqueeze_dim, len(cos.shape))
    cu, su = _cos_sin(op, cos, sin, q, p)
    return _standard(op, q, cu, su, r, interleaved), _standard(op, k, cu, su, r, interleaved)


def _rotary(op, x, cos_h, sin_h, cs_dtype, p: int, r: int, interleaved: bool):
    """RotaryEmbedding of x ([B, H, T, D] for p = 1, [B, T, H, D] for p = 2) with cos/sin [B?, T, R/2] of
    onnx_ir dtype cs_dtype (sliced values carry no dtype of their own while the graph is built)."""
    from onnx_ir import DataType

    from torchfast.ops._norm import onnx_math_type

    dims = _static(x.shape, "q/k")
    d = dims[-1]
    math, low = onnx_math_type(x.dtype)
    cast = low and cs_dtype == DataType.FLOAT
    xin = op.Cast(x, to=math) if cast else x
    c, s = cos_h, sin_h
    if not cast and cs_dtype != x.dtype:
        c, s = op.Cast(cos_h, to=x.dtype), op.Cast(sin_h, to=x.dtype)
    # [B, T, R/2] with x's batch: onnxruntime does not broadcast a cos/sin batch of 1.
    batch = op.Slice(op.Shape(x), _ints(op, [0]), _ints(op, [1]))
    full = op.Concat(batch, op.Slice(op.Shape(c), _ints(op, [1]), _ints(op, [3])), axis=0)
    c, s = op.Expand(c, full), op.Expand(s, full)
    attrs = {"interleaved": int(interleaved)}
    if r < d:
        attrs["rotary_embedding_dim"] = r
    if p == 1:
        y = op.RotaryEmbedding(xin, c, s, **attrs)
    else:
        heads = dims[2]
        flat = op.Reshape(xin, _ints(op, [0, 0, heads * d]))
        y = op.Reshape(op.RotaryEmbedding(flat, c, s, num_heads=heads, **attrs), _ints(op, [0, 0, heads, d]))
    return op.Cast(y, to=x.dtype) if cast else y


def rope_onnx_23(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """RotaryEmbedding (opset 23) where it applies (see the module docstring), else the standard ops."""
    from torchfast.export._tables import onnx_opset

    p = _position(unsqueeze_dim, len(cos.shape))
    shapes = [q.shape, k.shape]
    heads_known = all(s is not None and len(s) == 4 and isinstance(s[2], int) for s in shapes)
    if not (len(cos.shape) == 3 and p in (1, 2) and heads_known):
        return rope_onnx(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
    op = onnx_opset(ROTARY_OPSET)
    r = _static(cos.shape, "cos")[-1]
    half = (_ints(op, [0]), _ints(op, [r]), _ints(op, [-1]), _ints(op, [2])) if interleaved else \
        (_ints(op, [0]), _ints(op, [r // 2]), _ints(op, [-1]))
    cos_h, sin_h = op.Slice(cos, *half), op.Slice(sin, *half)
    return (_rotary(op, q, cos_h, sin_h, cos.dtype, p, r, interleaved),
            _rotary(op, k, cos_h, sin_h, cos.dtype, p, r, interleaved))


# ---- TorchScript exporter (torch._C graph) ----------------------------------------------------------

def _ts_sizes(v, what: str) -> list:
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._get_tensor_sizes(v)
    if not sizes or sizes[-1] is None:
        raise RuntimeError(f"torchfast.rope ONNX export: the last dimension of '{what}' must be known at "
                           f"export (got sizes {sizes})")
    return sizes


def _ts_slice(g, x, start: int, end: int):
    from torch.onnx import symbolic_helper

    return symbolic_helper._slice_helper(g, x, axes=[-1], starts=[start], ends=[end])


def _ts_shape(g, dims):
    import torch

    return g.op("Constant", value_t=torch.tensor(dims, dtype=torch.int64))


def _ts_standard(g, x, cu, su, r: int, interleaved: bool, math):
    from torchfast.ops._norm import ts_cast, ts_scalar_type

    sizes = _ts_sizes(x, "q/k")
    rank, d = len(sizes), sizes[-1]
    t = ts_scalar_type(x)
    low = math != t
    xr = x if r == d else _ts_slice(g, x, 0, r)
    xf = ts_cast(g, xr, math) if low else xr
    if interleaved:
        pairs = g.op("Reshape", xf, _ts_shape(g, _pair_shape(rank, r)))
        rot = g.op("Concat", g.op("Neg", _ts_slice(g, pairs, 1, 2)), _ts_slice(g, pairs, 0, 1), axis_i=-1)
        rot = g.op("Reshape", rot, _ts_shape(g, _pair_shape(rank, r, False)))
    else:
        rot = g.op("Concat", g.op("Neg", _ts_slice(g, xf, r // 2, r)), _ts_slice(g, xf, 0, r // 2), axis_i=-1)
    out = g.op("Add", g.op("Mul", xf, cu), g.op("Mul", rot, su))
    if low:
        out = ts_cast(g, out, t)
    if r < d:
        out = g.op("Concat", out, _ts_slice(g, x, r, d), axis_i=-1)
    return out


def rope_symbolic(g, q, k, cos, sin, unsqueeze_dim, interleaved):
    from torch.onnx import symbolic_helper

    from torchfast.ops._norm import ts_cast, ts_math_type, ts_scalar_type

    unsqueeze_dim = symbolic_helper._parse_arg(unsqueeze_dim, "i")
    interleaved = bool(symbolic_helper._parse_arg(interleaved, "b"))
    cos_sizes = _ts_sizes(cos, "cos")
    r = cos_sizes[-1]
    p = _position(unsqueeze_dim, len(cos_sizes))
    math = ts_math_type(ts_scalar_type(q))
    cu = symbolic_helper._unsqueeze_helper(g, cos, [p])
    su = symbolic_helper._unsqueeze_helper(g, sin, [p])
    if ts_scalar_type(cos) != math:
        cu, su = ts_cast(g, cu, math), ts_cast(g, su, math)
    return _ts_standard(g, q, cu, su, r, interleaved, math), _ts_standard(g, k, cu, su, r, interleaved, math)
