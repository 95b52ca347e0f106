"""Cross-entropy for LLM training: `cross_entropy`, and `linear_cross_entropy`, which never holds the
full [tokens, vocab] logits.

The math (softcap, label smoothing, z-loss, ignore_index, reductions, gradients) is in
torchfast/reference/cross_entropy.py. Per row of logits: one pass computes the max, the log-sum-exp
and the loss; backward recomputes softmax from the logits and the saved per-row lse, so nothing of
size [tokens, vocab] is kept between forward and backward (F.cross_entropy keeps its log-softmax).

`linear_cross_entropy(hidden, weight, target)` equals `cross_entropy(F.linear(hidden, weight), target)`
but runs over chunks of tokens: each chunk's logits go into one reused [chunk, V] buffer. In training
with reduction "mean"/"sum" the gradients of hidden, weight and bias are computed during the forward,
chunk by chunk (the logits buffer is turned into d loss / d logits in place, then the two gradient
GEMMs), and backward only scales them by the incoming scalar gradient: three GEMMs in all, as unfused
code, with a peak of one chunk instead of three [tokens, V] tensors. With reduction "none", backward
recomputes each chunk's logits (per-row gradients are known only then).

The ops (torch.ops.torchfast.*):
    cross_entropy(logits, target, *, ignore_index, label_smoothing, z_loss, softcap) -> (loss_rows, lse)
    cross_entropy_backward(grad_loss, logits, target, lse, *, ...) -> grad_logits
    linear_cross_entropy(hidden, weight, target, bias, *, ..., reduction, chunk_size, grad_mask)
        -> (loss, lse, grad_hidden, grad_weight, grad_bias)     (grads: empty unless computed)
    linear_cross_entropy_backward(grad_loss_rows, hidden, weight, target, bias, lse, *, ...) -> grads
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchfast import _dtensor, _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.reference.cross_entropy import (
    REDUCTIONS,
    acc_dtype,
    cross_entropy_backward_reference,
    cross_entropy_reference,
    cross_entropy_rows_reference,
    linear_cross_entropy_backward_reference,
    linear_cross_entropy_reference,
    reduce_loss,
)

_OPTS = "int ignore_index=-100, float label_smoothing=0., float z_loss=0., float? softcap=None"
SCHEMAS = {
    "cross_entropy": f"(Tensor logits, Tensor target, *, {_OPTS}) -> (Tensor, Tensor)",
    "cross_entropy_backward": f"(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, *, {_OPTS}) -> Tensor",
}
LINEAR_SCHEMAS = {
    "linear_cross_entropy": "(Tensor hidden, Tensor weight, Tensor target, Tensor? bias=None, *, "
    "int ignore_index=-100, str reduction=\"mean\", float label_smoothing=0., float z_loss=0., "
    "float? softcap=None, int chunk_size=4096, int grad_mask=0) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "linear_cross_entropy_backward": "(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, "
    f"Tensor? bias, Tensor lse, *, {_OPTS}, int chunk_size=4096, int grad_mask=7) "
    "-> (Tensor, Tensor, Tensor)",
}

# The logits buffer of one chunk of linear_cross_entropy: about CHUNK_BYTES, and at least CHUNK_MIN_ROWS
# rows. The buffer is what the op adds to the memory a step must hold anyway (grad_weight, grad_hidden),
# so it is kept small: at V = 32000 it is 16 MiB (float32) or 8 MiB (bfloat16) next to the 250 / 125 MiB
# of grad_weight. Fewer rows would slow the GEMMs: at 4096 x 2048 x 32000 on one AVX-512 core, 128-row
# chunks ran as fast as 512-row ones with the float32 GEMMs on oneDNN, and 64-row chunks 15% slower
# (MKL); bfloat16 the same within noise. `bench_cross_entropy.py --part linear --chunk-size N` compares.
#
# Large vocabularies (a row of at least LARGE_ROW_BYTES: V >= 131072 in bfloat16, 65536 in float32) take
# at least LARGE_MIN_ROWS rows: there the grad_hidden GEMM (M = rows, K = V) loses most at 128 rows
# (4096 x 2048 x 128256, one AVX-512 core: 150 GFLOP/s at 128 rows against 176 at 256 in bfloat16,
# 83 against 92 in float32, the other two GEMMs within 5% either way), and the buffer (63 / 125 MiB) is
# still an eighth of grad_weight, which the step holds anyway.
CHUNK_BYTES = 8 << 20
CHUNK_MIN_ROWS = 128
LARGE_ROW_BYTES = 250 << 10
LARGE_MIN_ROWS = 256


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: a [chunk, vocab] buffer of about CHUNK_BYTES (rounded down to a multiple of 32
    rows) but at least CHUNK_MIN_ROWS rows (LARGE_MIN_ROWS when a row is LARGE_ROW_BYTES or more),
    between 1 and `rows`."""
    per_row = max(1, vocab * dtype.itemsize)
    # A multiple of 32 rows: the GEMM kernels work on row panels of 16 to 32 (at V = 32000 in bfloat16,
    # 131 rows left 3-row panels in every chunk and a 35-row last chunk of 4096 tokens).
    fit = CHUNK_BYTES // per_row // 32 * 32
    least = LARGE_MIN_ROWS if per_row >= LARGE_ROW_BYTES else CHUNK_MIN_ROWS
    return max(1, min(max(rows, 1), max(least, fit)))


# ---- kernels of the build without _C ---------------------------------------------------------------

def _rows_kernel(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    loss, lse = cross_entropy_rows_reference(logits, target, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return loss, lse


def mask_bits(mask: int) -> tuple[bool, bool, bool]:
    """grad_mask of the linear ops: bit 1 hidden, bit 2 weight, bit 4 bias (an int in the schema:
    torch.jit.trace cannot record a bool[3])."""
    return bool(mask & 1), bool(mask & 2), bool(mask & 4)


def mask_int(hidden: bool, weight: bool, bias: bool) -> int:
    return int(hidden) | 2 * int(weight) | 4 * int(bias)


def _linear_kernel(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   z_loss=0.0, softcap=None, chunk_size=4096, grad_mask=0):
    grad_mask = mask_bits(grad_mask)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    with torch.no_grad():
        rows, lse = cross_entropy_rows_reference(F.linear(hidden, weight, bias), target, **opts)
        loss = reduce_loss(rows, target, ignore_index, reduction, rows.dtype)
        grads = [_empty_grad(hidden), _empty_grad(weight), _empty_grad(hidden if bias is None else bias)]
        if reduction != "none" and any(grad_mask):
            g = torch.ones_like(rows)
            if reduction == "mean":
                g = g / (target != ignore_index).sum()
            dh, dw, db = linear_cross_entropy_backward_reference(g, hidden, weight, target, bias, lse, **opts)
            for i, d in enumerate((dh, dw, db)):
                if grad_mask[i] and d is not None:
                    grads[i] = d
    return (loss, lse, *grads)


def _linear_backward_kernel(grad_loss, hidden, weight, target, bias, lse, *, chunk_size=4096, grad_mask=7, **opts):
    grad_mask = mask_bits(grad_mask)
    with torch.no_grad():
        dh, dw, db = linear_cross_entropy_backward_reference(grad_loss, hidden, weight, target, bias, lse, **opts)
    return (dh if grad_mask[0] else _empty_grad(hidden), dw if grad_mask[1] else _empty_grad(weight),
            db if grad_mask[2] and db is not None else _empty_grad(hidden if bias is None else bias))


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


_library.define_fallback(
    {**SCHEMAS, **LINEAR_SCHEMAS},
    {
        "cross_entropy": _rows_kernel,
        "cross_entropy_backward": cross_entropy_backward_reference,
        "linear_cross_entropy": _linear_kernel,
        "linear_cross_entropy_backward": _linear_backward_kernel,
    },
)


# ---- fake kernels -----------------------------------------------------------------------------------

def _rows_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(t.shape, dtype=acc_dtype(x.dtype))


@_library.register_fake("torchfast::cross_entropy")
def _cross_entropy_fake(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    _check_logits("cross_entropy", logits, target)
    return _rows_like(target, logits), _rows_like(target, logits)


@_library.register_fake("torchfast::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, logits, target, lse, **_opts):
    _check_logits("cross_entropy_backward", logits, target)
    return logits.new_empty(logits.shape)


@_library.register_fake("torchfast::linear_cross_entropy")
def _linear_fake(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, chunk_size=4096, grad_mask=0):
    _check_linear("linear_cross_entropy", hidden, weight, target, bias)
    grad_mask = mask_bits(grad_mask)
    sums = reduction != "none"
    loss = hidden.new_empty(() if sums else target.shape, dtype=acc_dtype(hidden.dtype))
    grads = (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if sums and grad_mask[0] else _empty_grad(hidden),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if sums and grad_mask[1] else _empty_grad(weight),
        torch.empty_like(bias) if sums and grad_mask[2] and bias is not None else _empty_grad(
            hidden if bias is None else bias),
    )
    return (loss, _rows_like(target, hidden), *grads)


@_library.register_fake("torchfast::linear_cross_entropy_backward")
def _linear_backward_fake(grad_loss, hidden, weight, target, bias, lse, *, chunk_size=4096, grad_mask=7, **_opts):
    _check_linear("linear_cross_entropy_backward", hidden, weight, target, bias)
    grad_mask = mask_bits(grad_mask)
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_mask[0] else _empty_grad(hidden),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_mask[1] else _empty_grad(weight),
        torch.empty_like(bias) if grad_mask[2] and bias is not None else _empty_grad(hidden if bias is None else bias),
    )


# ---- autograd ---------------------------------------------------------------------------------------
# With _C the forward ops' autograd is C++ (csrc/ops/cross_entropy/cross_entropy_autograd.cpp); these
# Python rules are the same math for the build without _C. The backward ops' autograd (their double
# backward) is Python in both cases: the vector-Jacobian product of the reference backward, with lse
# recomputed inside it from the inputs, so the second-order terms through lse are exact.

def _ce_opts(ctx) -> dict:
    return dict(ignore_index=ctx.ignore_index, label_smoothing=ctx.label_smoothing, z_loss=ctx.z_loss,
                softcap=ctx.softcap)


def _store_opts(ctx, kwargs) -> None:
    ctx.ignore_index = kwargs.get("ignore_index", -100)
    ctx.label_smoothing = kwargs.get("label_smoothing", 0.0)
    ctx.z_loss = kwargs.get("z_loss", 0.0)
    ctx.softcap = kwargs.get("softcap", None)


def _setup_ce(ctx, inputs, keyword_only_inputs, output):
    logits, target = inputs
    _store_opts(ctx, keyword_only_inputs)
    ctx.save_for_backward(logits, target, output[1])
    ctx.set_materialize_grads(False)


def _lse_term(grad_lse, logits, lse, softcap):
    from torchfast.reference.cross_entropy import lse_grad_term

    return lse_grad_term(grad_lse, logits, lse, softcap).to(logits.dtype)


def _backward_ce(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    dx = None
    if grad_loss is not None:
        dx = torch.ops.torchfast.cross_entropy_backward(grad_loss, logits, target, lse, **_ce_opts(ctx))
    if grad_lse is not None:
        term = _lse_term(grad_lse, logits, lse, ctx.softcap)
        dx = term if dx is None else dx + term
    return dx, None


def _setup_ce_bwd(ctx, inputs, keyword_only_inputs, output):
    _store_opts(ctx, keyword_only_inputs)
    ctx.save_for_backward(*inputs)


def _backward_ce_bwd(ctx, grad_dx):
    """Double backward: gradients for (grad_loss, logits); lse is recomputed from logits inside the
    vjp, so its dependence on logits is included and lse itself gets no gradient."""
    grad_loss, logits, target, _lse = ctx.saved_tensors
    opts = _ce_opts(ctx)

    def fn(g, x):
        lse = cross_entropy_rows_reference(x, target, **opts)[1]
        return cross_entropy_backward_reference(g, x, target, lse, **opts)

    _, vjp = torch.func.vjp(fn, grad_loss, logits)
    d_g, d_x = vjp(grad_dx.to(logits.dtype))
    return d_g, d_x, None, None


def _setup_linear_bwd(ctx, inputs, keyword_only_inputs, output):
    _store_opts(ctx, keyword_only_inputs)
    ctx.save_for_backward(*inputs)


def _backward_linear_bwd(ctx, grad_dh, grad_dw, grad_db):
    """Double backward of linear_cross_entropy_backward through the reference (full logits)."""
    grad_loss, hidden, weight, target, bias, _lse = ctx.saved_tensors
    opts = _ce_opts(ctx)
    primals = [grad_loss, hidden, weight] + ([bias] if bias is not None else [])

    def fn(g, h, w, *b):
        bb = b[0] if b else None
        lse = cross_entropy_rows_reference(F.linear(h, w, bb), target, **opts)[1]
        dh, dw, db = linear_cross_entropy_backward_reference(g, h, w, target, bb, lse, **opts)
        return (dh, dw, db) if b else (dh, dw)

    outs, vjp = torch.func.vjp(fn, *primals)
    cts = [torch.zeros_like(o) if c is None or c.numel() != o.numel() else c.to(o.dtype)
           for o, c in zip(outs, (grad_dh, grad_dw, grad_db))]
    grads = list(vjp(tuple(cts)))
    d_bias = grads[3] if bias is not None else None
    return grads[0], grads[1], grads[2], None, d_bias, None


_library.register_autograd_fallback("torchfast::cross_entropy", _backward_ce, _setup_ce)
torch.library.register_autograd("torchfast::cross_entropy_backward", _backward_ce_bwd, setup_context=_setup_ce_bwd)
torch.library.register_autograd("torchfast::linear_cross_entropy_backward", _backward_linear_bwd,
                                setup_context=_setup_linear_bwd)


def _setup_linear(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, target, bias = inputs
    _store_opts(ctx, keyword_only_inputs)
    ctx.reduction = keyword_only_inputs.get("reduction", "mean")
    ctx.chunk_size = keyword_only_inputs.get("chunk_size", 4096)
    ctx.done = mask_bits(keyword_only_inputs.get("grad_mask", 0))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, target, bias, output[1], *output[2:])
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _backward_linear(ctx, grad_loss, grad_lse, *_grads_of_grads):
    hidden, weight, target, bias, lse, *pre = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3])
    out = [None, None, None]
    if grad_loss is not None:
        if ctx.reduction != "none" and not torch.is_grad_enabled() and all(d or not n for d, n in zip(ctx.done, need)):
            out = [p * grad_loss if n else None for p, n in zip(pre, need)]
        else:
            rows = grad_loss
            if ctx.reduction == "mean":
                rows = grad_loss / (target != ctx.ignore_index).sum()
            rows = rows.expand(target.shape)
            grads = torch.ops.torchfast.linear_cross_entropy_backward(
                rows, hidden, weight, target, bias, lse, **_ce_opts(ctx), chunk_size=ctx.chunk_size, grad_mask=mask_int(*need))
            out = [g if n else None for g, n in zip(grads, need)]
    if grad_lse is not None:
        d = _lse_term(grad_lse, F.linear(hidden, weight, bias), lse, ctx.softcap).reshape(-1, weight.shape[0])
        h2 = hidden.reshape(-1, hidden.shape[-1])
        extra = (d.to(weight.dtype) @ weight, d.t().to(hidden.dtype) @ h2, d.sum(0))
        extra = (extra[0].reshape(hidden.shape), extra[1], extra[2])
        out = [o if not n else (e if o is None else o + e) for o, e, n in zip(out, extra, need)]
    return out[0], out[1], None, out[2]


_library.register_autograd_fallback("torchfast::linear_cross_entropy", _backward_linear, _setup_linear)


# ---- autocast ---------------------------------------------------------------------------------------
# cross_entropy: the logits as they are (fp32 math inside; torch's own autocast would cast them up to
# fp32, a full copy of the largest tensor of the step). linear_cross_entropy: hidden, weight and bias go
# to the autocast dtype, as F.linear's autocast rule casts them; the casts are recorded by autograd, so
# an fp32 master weight gets its gradient in fp32.

def _autocast_linear(hidden, weight, target, bias=None, **kwargs):
    dt = torch.get_autocast_dtype(hidden.device.type)
    cast = lambda t: t if t is None or not t.is_floating_point() or t.dtype == dt else t.to(dt)  # noqa: E731
    return (cast(hidden), cast(weight), target, cast(bias)), kwargs


_library.register_autocast_same_dtype("torchfast::cross_entropy")
_library.register_autocast_same_dtype("torchfast::cross_entropy_backward")
_library.register_autocast_casting("torchfast::linear_cross_entropy", _autocast_linear)
_library.register_autocast_same_dtype("torchfast::linear_cross_entropy_backward")


# ---- checks shared by the public functions and the fake kernels -------------------------------------
# Plain `if`s (see torchfast/ops/_norm.py check_args): Dynamo traces them from the public functions.

def _check_target(op: str, target, x, x_arg: str) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"torchfast.{op}: argument 'target' must be a Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"torchfast.{op}: argument 'target' has dtype {target.dtype}; expected class indices of "
                        "dtype int64 (or int32); probability targets are not supported")
    if target.device != x.device:
        raise RuntimeError(f"torchfast.{op}: '{x_arg}' is on {x.device} but 'target' is on {target.device}; they "
                           "must be on the same device")
    if x.dim() < 1:  # (the shape message below would read "shape () but 'logits' has shape ()")
        raise RuntimeError(f"torchfast.{op}: argument '{x_arg}' is 0-dimensional; it needs a last dimension "
                           "(the classes)")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise RuntimeError(f"torchfast.{op}: argument 'target' has shape {tuple(target.shape)} but '{x_arg}' has "
                           f"shape {tuple(x.shape)}; target must have the shape of {x_arg} without its last "
                           f"dimension ({tuple(x.shape[:-1])})")


def _check_logits(op: str, logits, target) -> None:
    _check_target(op, target, logits, "logits")
    if logits.shape[-1] == 0:
        raise RuntimeError(f"torchfast.{op}: argument 'logits' has shape {tuple(logits.shape)}: its last dimension "
                           "(the classes) is empty")


def _check_linear(op: str, hidden, weight, target, bias) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise RuntimeError(f"torchfast.{op}: 'hidden' is on {hidden.device} but '{name}' is on {t.device}; "
                               "they must be on the same device")
    _check_target(op, target, hidden, "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise RuntimeError(f"torchfast.{op}: argument 'weight' has shape {tuple(weight.shape)} but 'hidden' has "
                           f"shape {tuple(hidden.shape)}; weight must be [vocab, {hidden.shape[-1]}]")
    if weight.shape[0] == 0:
        raise RuntimeError(f"torchfast.{op}: argument 'weight' has shape {tuple(weight.shape)}: the vocabulary "
                           "(its first dimension) is empty")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"torchfast.{op}: argument 'bias' has shape {tuple(bias.shape)}; expected "
                           f"[{weight.shape[0]}] (weight.shape[0])")


def _check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"torchfast.{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}; "
                         f"got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"torchfast.{op}: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"torchfast.{op}: z_loss must be a finite number >= 0; got {z_loss}")
    if softcap is not None and not 0.0 < softcap < float("inf"):
        raise ValueError(f"torchfast.{op}: softcap must be None or a finite number > 0; got {softcap}")


# ---- registry and public functions ------------------------------------------------------------------

def _native_cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          z_loss=0.0, softcap=None):
    rows, _ = torch.ops.torchfast.cross_entropy(logits, target, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return reduce_loss(rows, target, ignore_index, reduction, logits.dtype)


def _grad_mask(*tensors) -> int:
    on = torch.is_grad_enabled()
    return mask_int(*(bool(on and t is not None and t.requires_grad) for t in tensors))


def _native_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None):
    if chunk_size is None:
        chunk_size = default_chunk_size(target.numel(), weight.shape[0], hidden.dtype)
    # On token-sharded DTensors no rank knows the global count of non-ignored tokens that "mean" divides
    # by: each rank sums its tokens (a Partial loss) and the division by the all-reduced count is a
    # DTensor op, whose backward scales the gradients the forward computed for "sum".
    dtensor_mean = reduction == "mean" and _dtensor.is_dtensor(hidden)
    loss = torch.ops.torchfast.linear_cross_entropy(
        hidden, weight, target, bias, ignore_index=ignore_index,
        reduction="sum" if dtensor_mean else reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
        grad_mask=_grad_mask(hidden, weight, bias))[0]
    if dtensor_mean:
        loss = loss / (target != ignore_index).sum()
    return loss.to(hidden.dtype)


def _triton_cross_entropy(logits, target, **kwargs):
    from torchfast.triton.cross_entropy import cross_entropy as triton_cross_entropy  # imports Triton

    return triton_cross_entropy(logits, target, **kwargs)


def _triton_linear_cross_entropy(hidden, weight, target, bias=None, **kwargs):
    from torchfast.triton.cross_entropy import linear_cross_entropy as triton_linear_cross_entropy

    return triton_linear_cross_entropy(hidden, weight, target, bias, **kwargs)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


_REF_DEVICES = ("cpu", "cuda", "meta", "mps", "xpu", "xla")
# The Triton kernels take their float options as fp32 scalars, so float64 is left to the other impls.
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _targets(shape, v, device, ignored=True, ignore_index=-100):
    t = torch.randint(0, v, shape, device=device)
    if ignored and t.numel() > 1:
        t.view(-1)[::3] = ignore_index
    return t


def _sample_inputs(device, dtype):
    """(args, kwargs): odd class counts, ignored rows, every option, [..., V] logits, a strided view."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 3  # noqa: E731
    return [
        ((make(6, 37), _targets((6,), 37, device)), {"label_smoothing": 0.1, "z_loss": 1e-3}),
        ((make(5, 300), _targets((5,), 300, device, ignored=False)), {}),
        ((make(2, 3, 41), _targets((2, 3), 41, device)), {"softcap": 5.0}),
        ((make(4, 80)[:, ::2], _targets((4,), 40, device, ignore_index=7)), {"ignore_index": 7}),
        ((make(0, 16), _targets((0,), 16, device)), {}),
    ]


def _linear_sample_inputs(device, dtype):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    return [
        ((make(7, 16), make(37, 16) * 0.5, _targets((7,), 37, device)), {"chunk_size": 3, "label_smoothing": 0.1}),
        ((make(2, 3, 8), make(29, 8) * 0.5, _targets((2, 3), 29, device), make(29)),
         {"reduction": "sum", "softcap": 4.0, "z_loss": 1e-3}),
        ((make(5, 12), make(33, 12) * 0.5, _targets((5,), 33, device)), {"reduction": "none", "chunk_size": 2}),
    ]


SPEC = register(
    OpSpec(
        name="cross_entropy",
        schemas=SCHEMAS,
        reference=cross_entropy_reference,
        arg_names=("logits",),
        impls=[
            Impl("native", _native_cross_entropy, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::cross_entropy")),
            Impl("triton", _triton_cross_entropy, ("cuda", "cpu"), dtypes=_TRITON_DTYPES,
                 unavailable=_triton_unavailable),
            Impl("reference", cross_entropy_reference, _REF_DEVICES, auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)

LINEAR_SPEC = register(
    OpSpec(
        name="linear_cross_entropy",
        schemas=LINEAR_SCHEMAS,
        reference=linear_cross_entropy_reference,
        arg_names=("hidden", "weight", "bias"),
        impls=[
            Impl("native", _native_linear_cross_entropy, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::linear_cross_entropy")),
            Impl("triton", _triton_linear_cross_entropy, ("cuda", "cpu"), dtypes=_TRITON_DTYPES,
                 unavailable=_triton_unavailable),
            Impl("reference", linear_cross_entropy_reference, _REF_DEVICES, auto=False),
        ],
        sample_inputs=_linear_sample_inputs,
    )
)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  impl: str | None = None) -> torch.Tensor:
    """Cross-entropy of class-index targets over the last dimension, fused: one pass over each row.

    loss_row = lse(s) - (1 - label_smoothing) * s[target] - label_smoothing * mean(s) + z_loss * lse(s)^2,
    with s = softcap * tanh(logits / softcap) when softcap is given (Gemma 2), else s = logits; rows
    whose target is ignore_index count 0 and are left out of the mean.

    Args:
        logits: [..., V] float32/float64/bfloat16/float16 on CPU or CUDA, any layout.
        target: [...] int64 (or int32) class indices in [0, V), or ignore_index.
        ignore_index, reduction ("mean" | "sum" | "none"), label_smoothing: as F.cross_entropy.
        z_loss: weight of the PaLM auxiliary loss lse^2 (averaged like the main loss).
        softcap: logit soft-capping value, or None.
        impl: "auto" (default), "native", "triton" or "reference"; overrides `torchfast.use_impl`.

    Returns the loss in logits' dtype (math in float32, float64 for float64). For the arguments it shares
    with F.cross_entropy (2-D logits, or [..., V] flattened) the result is F.cross_entropy's. Backward
    saves the logits and one float per row: no log-softmax is kept.
    """
    fn = select(SPEC, (logits,), impl, others=[("target", target)]).fn
    _check_options("cross_entropy", reduction, label_smoothing, z_loss, softcap)
    _check_logits("cross_entropy", logits, target)
    return fn(logits, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              z_loss=z_loss, softcap=softcap)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None, impl: str | None = None) -> torch.Tensor:
    """`cross_entropy(F.linear(hidden, weight, bias), target, ...)` without ever building the full logits.

    Tokens are processed `chunk_size` at a time (default: a [chunk, V] logits buffer of about 8 MiB, at least 128 rows);
    with reduction "mean"/"sum" the gradients of hidden, weight and bias are computed during the forward
    and scaled in backward (three GEMMs, as unfused code). Works with a tied weight (an embedding matrix),
    with hidden that does not require grad, and under autocast (hidden, weight and bias are cast to the
    autocast dtype as F.linear would; the loss math stays in float32).

    Args:
        hidden: [..., H]; weight: [V, H]; bias: [V] or None; target: [...] (hidden's shape without H).
        The loss options are those of `torchfast.cross_entropy`.
    Returns the loss in hidden's dtype (the dtype F.linear's logits would have).
    """
    tensors = (hidden, weight, hidden if bias is None else bias)
    fn = select(LINEAR_SPEC, tensors, impl, others=[("target", target)]).fn
    _check_options("linear_cross_entropy", reduction, label_smoothing, z_loss, softcap)
    _check_linear("linear_cross_entropy", hidden, weight, target, bias)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"torchfast.linear_cross_entropy: chunk_size must be a positive int or None; got {chunk_size!r}")
    if not _autocast_on(hidden) and (weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype)):
        raise TypeError(f"torchfast.linear_cross_entropy: 'weight' has dtype {weight.dtype}"
                        + (f" and 'bias' {bias.dtype}" if bias is not None else "")
                        + f" but 'hidden' has dtype {hidden.dtype}; they must match (or run under torch.autocast)")
    return fn(hidden, weight, target, bias, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size)


def _autocast_on(x: torch.Tensor) -> bool:
    dev = x.device.type
    return dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)


SPEC.function = cross_entropy
LINEAR_SPEC.function = linear_cross_entropy


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only (SoftmaxCrossEntropyLoss for plain 2-D logits, elementary ops otherwise):
# the translations are in torchfast/ops/_cross_entropy_onnx.py.
from torchfast.ops import _cross_entropy_onnx as _onnx  # noqa: E402

SPEC.onnx_translations["cross_entropy"] = {_onnx.OPSET: _onnx.cross_entropy_onnx}
SPEC.onnx_symbolics["cross_entropy"] = {_onnx.LEGACY_OPSET: _onnx.cross_entropy_symbolic}
LINEAR_SPEC.onnx_translations["linear_cross_entropy"] = {_onnx.OPSET: _onnx.linear_cross_entropy_onnx}
LINEAR_SPEC.onnx_symbolics["linear_cross_entropy"] = {
    _onnx.LEGACY_OPSET: _onnx.linear_cross_entropy_symbolic}
# --- end ONNX ---------------------------------------------------------------------------------------
