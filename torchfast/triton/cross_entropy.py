"""cross_entropy and linear_cross_entropy in Triton: the math of torchfast/reference/cross_entropy.py
(softcap, label smoothing, z-loss, ignore_index), for CUDA tensors (CPU tensors under TRITON_INTERPRET=1,
for tests).

    _cross_entropy_fwd_kernel    one program per row: one pass over the row in BLOCK_V blocks with an
                                 online max / sum-exp gives lse and the loss; with WRITE_GRAD a second
                                 pass writes the row's gradient (in place, for linear_cross_entropy)
    _cross_entropy_bwd_kernel    one program per row: the gradient from the saved lse
    cross_entropy_fwd / cross_entropy_bwd          launchers (checks, outputs, launch)
    torchfast::cross_entropy_triton,
    torchfast::cross_entropy_backward_triton       triton_ops with autograd (double backward too)
    cross_entropy(...)           what impl="triton" runs: the op, then the reduction in torch ops
    linear_cross_entropy(...)    hidden @ weight^T (+ bias), then cross_entropy, in chunks of tokens
                                 that reuse one [chunk, V] buffer; never holds the [N, V] logits

Numerics:
- Logits of any float dtype but float64 are read, widened to fp32 and computed in fp32; the per-row
  loss and lse are fp32, the gradient is rounded once to the logits' dtype. float64 logits are refused
  (TypeError): Triton passes Python float arguments (label_smoothing, z_loss, softcap) as fp32, so an
  fp64 kernel could not honour the reference's fp64 math; impl="native" computes them in fp64.
- Online log-sum-exp: with m the running max, l = sum_j exp(s_j - m_ref) where m_ref is m, or 0 when
  m is infinite. Rescaling by exp(m_old - m_ref_new) then gives torch.logsumexp's special values:
  a row of -inf has lse = -inf (l stays 0), a NaN gives NaN; a +inf logit gives NaN (not
  logsumexp's +inf), as F.cross_entropy's row is then NaN.
- tanh for the softcap is computed here (libdevice's tanh does not run in the interpreter): Cephes'
  tanhf polynomial below |y| = 0.625, where 1 - 2 / (exp(2|y|) + 1) would cancel, that formula above.
  Both are within a few fp32 ulp.
- A target outside [0, V) that is not ignore_index gives a NaN loss and NaN gradient for its row (the
  reference raises; checking on the host would synchronize with the GPU).
- Offsets are int64: row * row_stride passes 2^31 for large vocabularies.

As for the other Triton ops, tracing the triton_ops (opcheck's fake tensors, torch.compile) only works
on a GPU. linear_cross_entropy is a torch.autograd.Function around the same kernel (its dispatcher op
lives in torchfast/ops/cross_entropy.py); it has no double backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from torch.library import triton_op, wrap_triton

from torchfast.reference.cross_entropy import (
    REDUCTIONS,
    cross_entropy_backward_reference,
    lse_grad_term,
    reduce_loss,
)
from torchfast.triton import row_grid, unavailable_reason

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of a row per loop step: 4096 fp32 values are 16 per thread at 8 warps. Module-level so tests
# can lower it to exercise rows of several blocks with small V.
MAX_BLOCK_V = 4096
# linear_cross_entropy's default chunk: the rows whose logits fit in this many bytes.
CHUNK_BYTES = 64 * 2**20


@triton.jit
def _tanh(y):
    a = tl.abs(y)
    z = a * a
    # Cephes tanhf for |y| < 0.625 (relative error ~1e-7); 1 - 2 / (e + 1) cancels there.
    small = a + a * z * (-3.33332819422e-1 + z * (1.33314422036e-1 + z * (
        -5.37397155531e-2 + z * (2.06390887954e-2 + z * -5.70498872745e-3))))
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # exp overflows to inf above |y| ~ 44: gives 1
    t = tl.where(a < 0.625, small, large)  # NaN fails the test and stays NaN through `large`
    return tl.where(y < 0, -t, t)


@triton.jit
def _softcapped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    s = x
    if HAS_SOFTCAP:
        s = softcap * _tanh(x / softcap)
    return s


@triton.jit
def _row_grad(x_row, dx_row, V, t, lse, g, label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """dx_j = g * (p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t]) * softcap'(x_j), p = exp(s - lse).
    dx_row may be x_row: each block is read before it is written."""
    cols = tl.arange(0, BLOCK_V)
    scale = 1.0 + 2.0 * z_loss * lse
    smooth = label_smoothing / V
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        s = _softcapped(x, softcap, HAS_SOFTCAP)
        d = tl.exp(s - lse) * scale - smooth - tl.where(c == t, 1.0 - label_smoothing, 0.0)
        d = d * g
        if HAS_SOFTCAP:
            r = s / softcap
            d = d * (1.0 - r * r)
        tl.store(dx_row + c, d.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _row_target(t_ptr, row, V, ignore_index):
    """(target, ignored?, in range?) of a row."""
    t = tl.load(t_ptr + row).to(tl.int64)
    return t, t == ignore_index, (t >= 0) & (t < V)


@triton.jit
def _row_g(g_ptr, g_stride, row, ignored, in_range):
    """The gradient reaching the row's loss: 0 for an ignored row, NaN for a target out of range."""
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    g = tl.where(in_range, g, float("nan"))
    return tl.where(ignored, 0.0, g)


@triton.jit
def _cross_entropy_fwd_kernel(x_ptr, x_stride, t_ptr, loss_ptr, lse_ptr, g_ptr, g_stride, V, ignore_index,
                              label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr,
                              HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                              WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    s_sum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, _softcapped(x, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        m_ref = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
        l = l * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref), 0)
        m = m_new
        if HAS_SMOOTHING:
            s_sum += tl.sum(tl.where(mask, s, 0.0), 0)
    lse = tl.where(tl.abs(m) == float("inf"), 0.0, m) + tl.log(l)
    lse = tl.where(m == float("inf"), float("nan"), lse)  # F.cross_entropy's row is NaN then

    t, ignored, in_range = _row_target(t_ptr, row, V, ignore_index)
    s_t = _softcapped(tl.load(x_row + tl.where(in_range, t, 0)).to(tl.float32), softcap, HAS_SOFTCAP)
    loss = lse - (1.0 - label_smoothing) * s_t
    # Gated like the reference: 0 * inf would turn an infinite mean or lse into NaN.
    if HAS_SMOOTHING:
        loss -= label_smoothing * (s_sum / V)
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        g = _row_g(g_ptr, g_stride, row, ignored, in_range)
        _row_grad(x_row, x_row, V, t, lse, g, label_smoothing, z_loss, softcap, HAS_SOFTCAP, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(g_ptr, g_stride, x_ptr, x_stride, t_ptr, lse_ptr, dx_ptr, dx_stride, V,
                              ignore_index, label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr,
                              BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t, ignored, in_range = _row_target(t_ptr, row, V, ignore_index)
    g = _row_g(g_ptr, g_stride, row, ignored, in_range)
    lse = tl.load(lse_ptr + row)
    _row_grad(x_ptr + row * x_stride, dx_ptr + row * dx_stride, V, t, lse, g, label_smoothing, z_loss,
              softcap, HAS_SOFTCAP, BLOCK_V)


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None

    def launch_args(self) -> tuple:
        return (self.ignore_index, self.label_smoothing, self.z_loss,
                1.0 if self.softcap is None else self.softcap)


def _launch_meta(v: int) -> dict:
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(v)))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def _check_options(op: str, reduction: str | None, label_smoothing: float, softcap: float | None) -> None:
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"torchfast.{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"torchfast.{op}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"torchfast.{op}: softcap must be positive (or None), got {softcap}")


def _check_tensor(t: torch.Tensor, op: str, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"torchfast.{op}: argument '{arg}' must be a Tensor, got {type(t).__name__}")
    if t.dtype == torch.float64:
        raise TypeError(f"torchfast.{op} (triton): argument '{arg}' is float64; the Triton kernels compute "
                        "in float32 only. Use impl='native' for float64 (computed in float64)")
    if t.dtype not in _DTYPES:
        raise TypeError(f"torchfast.{op} (triton): argument '{arg}' has dtype {t.dtype}; supported dtypes "
                        "are float32, bfloat16 and float16")
    why = unavailable_reason(t.device.type)
    if why:
        raise RuntimeError(f"torchfast.{op} (triton): argument '{arg}' is on {t.device}: {why}")


def _check_target(target: torch.Tensor, rows_shape: torch.Size, device: torch.device, op: str) -> None:
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype.is_complex \
            or target.dtype == torch.bool:
        raise TypeError(f"torchfast.{op}: 'target' must be a tensor of class indices (an integer dtype)")
    if target.shape != rows_shape:
        raise RuntimeError(f"torchfast.{op}: 'target' has shape {tuple(target.shape)}; expected "
                           f"{tuple(rows_shape)}")
    if target.device != device:
        raise RuntimeError(f"torchfast.{op}: 'target' is on {target.device}, the inputs on {device}")


def _rows(logits: torch.Tensor, target: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits as [N, V] (a view when the leading dims allow one; the kernels need unit column stride)
    and target as [N]."""
    _check_tensor(logits, op, "logits")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise RuntimeError(f"torchfast.{op}: 'logits' must have a non-empty last (class) dimension, got "
                           f"shape {tuple(logits.shape)}")
    _check_target(target, logits.shape[:-1], logits.device, op)
    x2 = logits.reshape(-1, logits.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2, target.reshape(-1)


def _g_stride(g: torch.Tensor) -> int:
    return g.stride(0) if g.dim() else 0


def _fwd_rows(x2: torch.Tensor, t1: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor, opts: _Options,
              g: torch.Tensor | None = None) -> None:
    """Per-row loss and lse of x2 [N, V] into loss and lse [N]; with g (per-row [N], or a 0-d tensor for
    every row) the rows of x2 are overwritten by their gradient."""
    n, v = x2.shape
    if n == 0:
        return
    wrap_triton(_cross_entropy_fwd_kernel)[row_grid(n, "cross_entropy")](
        x2, x2.stride(0), t1, loss, lse, g if g is not None else lse, _g_stride(g) if g is not None else 0, v,
        *opts.launch_args(), HAS_SOFTCAP=opts.softcap is not None, HAS_SMOOTHING=opts.label_smoothing != 0.0,
        HAS_Z_LOSS=opts.z_loss != 0.0, WRITE_GRAD=g is not None, **_launch_meta(v))


def _bwd_rows(g: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, lse: torch.Tensor, dx2: torch.Tensor,
              opts: _Options) -> None:
    """The gradient of x2's rows into dx2 (which may be x2) from the saved lse and per-row g."""
    n, v = x2.shape
    if n == 0:
        return
    wrap_triton(_cross_entropy_bwd_kernel)[row_grid(n, "cross_entropy_backward")](
        g, _g_stride(g), x2, x2.stride(0), t1, lse, dx2, dx2.stride(0), v, *opts.launch_args(),
        HAS_SOFTCAP=opts.softcap is not None, **_launch_meta(v))


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, lse), fp32, shaped like target, by `_cross_entropy_fwd_kernel`: the outputs of
    cross_entropy_rows_reference. Not differentiable."""
    _check_options("cross_entropy", None, label_smoothing, softcap)
    x2, t1 = _rows(logits, target, "cross_entropy")
    loss = torch.empty(target.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    _fwd_rows(x2, t1, loss, lse, _Options(ignore_index, label_smoothing, z_loss, softcap))
    return loss, lse


def cross_entropy_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None
                      ) -> torch.Tensor:
    """d loss / d logits (logits' dtype, contiguous) from the per-row gradient and the saved lse, by
    `_cross_entropy_bwd_kernel`: cross_entropy_backward_reference's output. Not differentiable."""
    x2, t1 = _rows(logits, target, "cross_entropy_backward")
    for name, t in (("grad_loss", grad_loss), ("lse", lse)):
        if t.shape != target.shape:
            raise RuntimeError(f"torchfast.cross_entropy_backward: '{name}' has shape {tuple(t.shape)}; "
                               f"expected {tuple(target.shape)}")
    dx = torch.empty(x2.shape, dtype=logits.dtype, device=logits.device)
    _bwd_rows(grad_loss.reshape(-1), x2, t1, lse.reshape(-1).contiguous(), dx,
              _Options(ignore_index, label_smoothing, z_loss, softcap))
    return dx.reshape(logits.shape)


# Schemas from the type hints: (Tensor logits, Tensor target, int ignore_index, float label_smoothing,
# float z_loss, float? softcap) -> (Tensor, Tensor), ...
cross_entropy_triton = triton_op("torchfast::cross_entropy_triton", cross_entropy_fwd, mutates_args=())
cross_entropy_backward_triton = triton_op("torchfast::cross_entropy_backward_triton", cross_entropy_bwd,
                                          mutates_args=())


def _setup(ctx, inputs, output):
    logits, target, *options = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.options = options
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    dx = None
    if grad_loss is not None:
        dx = torch.ops.torchfast.cross_entropy_backward_triton(grad_loss, logits, target, lse, *ctx.options)
    if grad_lse is not None:  # only a double backward sends one
        term = lse_grad_term(grad_lse, logits, lse, ctx.options[-1])
        dx = (term if dx is None else dx.to(term.dtype) + term).to(logits.dtype)
    return dx, None, None, None, None, None


def _setup_bwd(ctx, inputs, output):
    grad_loss, logits, target, lse, *options = inputs
    ctx.save_for_backward(grad_loss, logits, target, lse)
    ctx.options = options
    ctx.set_materialize_grads(False)


def _backward_bwd(ctx, grad_dx):
    """Double backward: the vector-Jacobian product of the (differentiable) reference backward, through
    torch.func so that it is itself differentiable."""
    grad_loss, logits, target, lse = ctx.saved_tensors
    if grad_dx is None:
        return (None,) * 8
    ignore_index, label_smoothing, z_loss, softcap = ctx.options

    def reference(g, x, s):
        return cross_entropy_backward_reference(g, x, target, s, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing, z_loss=z_loss,
                                                softcap=softcap)

    _, vjp = torch.func.vjp(reference, grad_loss, logits, lse)
    d_grad_loss, d_logits, d_lse = vjp(grad_dx.to(logits.dtype))
    return d_grad_loss, d_logits, None, d_lse, None, None, None, None


cross_entropy_triton.register_autograd(_backward, setup_context=_setup)
cross_entropy_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_bwd)


def cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None):
    """What torchfast.cross_entropy(..., impl="triton") runs: differentiable; saves logits, target and the
    per-row lse (no [N, V] tensor of its own). The reduction runs in torch ops on the fp32 row losses."""
    _check_options("cross_entropy", reduction, label_smoothing, softcap)
    rows, _ = torch.ops.torchfast.cross_entropy_triton(
        logits, target, int(ignore_index), float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap))
    return reduce_loss(rows, target, ignore_index, reduction, logits.dtype)


# ---- linear_cross_entropy -------------------------------------------------------------------------


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk such that the [chunk, V] logits buffer takes about CHUNK_BYTES: 1 to `rows`."""
    return max(1, min(rows, CHUNK_BYTES // max(1, vocab * dtype.itemsize)))


class _GradSums:
    """The gradients of hidden, weight and bias, filled chunk by chunk from each chunk's dlogits d:
    grad_hidden[chunk] = d @ W, grad_weight += d^T @ h, grad_bias += column sums of d. The weight and
    bias sums run over every chunk, so they are kept in fp32 (a bf16/fp16 chunk product is rounded once,
    then added in fp32); grad_hidden rows are written once, in hidden's dtype."""

    def __init__(self, h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, need: tuple):
        need_h, need_w, need_b = need
        self.h = torch.empty_like(h2) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

    def add(self, start: int, d: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        if self.h is not None:
            torch.mm(d, weight, out=self.h[start:start + d.shape[0]])
        if self.w is not None:
            if d.dtype == torch.float32:
                self.w.addmm_(d.t(), h)
            else:
                self.w.add_(torch.mm(d.t(), h))
        if self.b is not None:
            self.b.add_(d.sum(0, dtype=torch.float32))

    def results(self, likes: tuple, grad_out: torch.Tensor | None = None) -> tuple:
        """(grad_hidden, grad_weight, grad_bias) shaped and typed as `likes` ((shape, dtype) or None each),
        times grad_out (0-d) when given."""
        def finish(acc, like):
            if acc is None:
                return None
            if grad_out is not None:
                acc = acc * grad_out.to(acc.dtype)
            return acc.to(like[1]).reshape(like[0])

        return tuple(finish(acc, like) for acc, like in zip((self.h, self.w, self.b), likes))


def _like(t: torch.Tensor | None):
    return None if t is None else (t.shape, t.dtype)


def _chunked(h2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int):
    """For each chunk of rows: (start, end, logits buffer holding h2[start:end] @ W^T + b, h2[start:end]).
    One [chunk, V] buffer serves every chunk."""
    n = h2.shape[0]
    buf = h2.new_empty((min(chunk, n), weight.shape[0]))
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        b, h = buf[:end - start], h2[start:end]
        if bias is None:
            torch.mm(h, weight.t(), out=b)
        else:
            torch.addmm(bias, h, weight.t(), out=b)
        yield start, end, b, h


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts: _Options, reduction: str, chunk: int, need: tuple):
        h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        rows = torch.empty(h2.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(rows)
        # mean/sum: each row's loss gradient is known now (1, or 1 / count), so the gradients are built
        # here, while each chunk's logits are at hand, and the backward only scales them.
        grads = _GradSums(h2, weight, bias, need) if reduction != "none" and any(need) else None
        g = None
        if grads is not None:
            g = torch.ones((), dtype=torch.float32, device=hidden.device)
            if reduction == "mean":  # a device tensor, no host synchronization; 1/0 = inf reaches no row
                g = g / (t1 != opts.ignore_index).sum()
        for start, end, b, h in _chunked(h2, weight, bias, chunk):
            _fwd_rows(b, t1[start:end], rows[start:end], lse[start:end], opts, g)
            if grads is not None:
                grads.add(start, b, h, weight)
        ctx.grads, ctx.opts, ctx.chunk, ctx.need = grads, opts, chunk, need
        ctx.likes = (_like(hidden), _like(weight), _like(bias))
        if grads is None and any(need):  # reduction "none": the backward recomputes the logits
            ctx.save_for_backward(hidden, weight, bias, target, lse)
        return reduce_loss(rows.reshape(target.shape), target, opts.ignore_index, reduction, hidden.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is not None:
            dh, dw, db = ctx.grads.results(ctx.likes, grad_loss)
        else:
            dh, dw, db = _linear_backward_none(ctx, grad_loss)
        return dh, dw, db, None, None, None, None, None


def _linear_backward_none(ctx, grad_loss):
    """Reduction "none": per chunk, recompute the logits into the buffer, overwrite them with their
    gradient (saved lse, per-row grad_loss) and accumulate the three gradients."""
    hidden, weight, bias, target, lse = ctx.saved_tensors
    h2, t1, g = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1), grad_loss.reshape(-1)
    grads = _GradSums(h2, weight, bias, ctx.need)
    for start, end, b, h in _chunked(h2, weight, bias, ctx.chunk):
        _bwd_rows(g[start:end], b, t1[start:end], lse[start:end], b, ctx.opts)
        grads.add(start, b, h, weight)
    return grads.results(ctx.likes)


def _check_linear_args(hidden, weight, bias, target) -> None:
    op = "linear_cross_entropy"
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(t, op, name)
            if t.dtype != hidden.dtype or t.device != hidden.device:
                raise TypeError(f"torchfast.{op}: '{name}' ({t.dtype}, {t.device}) must have hidden's dtype "
                                f"and device ({hidden.dtype}, {hidden.device})")
    h = hidden.shape[-1] if hidden.dim() else None
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != h or \
            (bias is not None and bias.shape != weight.shape[:1]):
        raise RuntimeError(f"torchfast.{op}: expected hidden [..., H], weight [V, H] (V > 0) and bias [V]; "
                           f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                           f"{None if bias is None else tuple(bias.shape)}")
    _check_target(target, hidden.shape[:-1], hidden.device, op)


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None):
    """cross_entropy(F.linear(hidden, weight, bias), target) without the full logits: what
    torchfast.linear_cross_entropy(..., impl="triton") runs. hidden [..., H], weight [V, H], bias [V],
    target [...]; chunk_size rows at a time (default: a logits buffer of about CHUNK_BYTES). Differentiable
    in hidden, weight and bias (no double backward)."""
    _check_options("linear_cross_entropy", reduction, label_smoothing, softcap)
    _check_linear_args(hidden, weight, bias, target)
    n = target.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n, weight.shape[0], hidden.dtype)
    elif chunk_size < 1:
        raise ValueError(f"torchfast.linear_cross_entropy: chunk_size must be at least 1, got {chunk_size}")
    need = (False, False, False)
    if torch.is_grad_enabled():
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    opts = _Options(int(ignore_index), float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap))
    return _LinearCrossEntropy.apply(hidden, weight, bias, target, opts, reduction, int(chunk_size), need)
