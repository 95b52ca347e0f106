"""Rotary position embedding in Triton: the math of torchfast/reference/rope.py.

Layers as in torchfast/triton/swish.py: the kernel `_rope_kernel` (one launch per tensor, ROWS rows of
one operand per program, every pair of a row in one block); the launchers `rope_fwd` / `rope_bwd`
(checks, layouts, launches; not differentiable); the operators torchfast::rope_triton and
torchfast::rope_backward_triton (triton_op), whose autograd saves cos and sin only (q and k too when
cos or sin requires grad); and `rope`, what the registry's impl="triton" runs.

Layouts are the native ops': outputs are torch.empty_like(q) / empty_like(k); rows are walked through up
to three leading dimensions with their own strides for x, the output and cos/sin (0 where cos/sin are
broadcast), after merging the dimensions that are contiguous for all three, so cos/sin are never
expanded in memory except for inputs whose leading dimensions do not merge into three.
On CPU the kernel runs under TRITON_INTERPRET=1; tracing it works on a GPU only (see swish.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast import _library
from torchfast.reference.rope import (
    autocast_args,
    check_args,
    rope_backward_reference,
    rope_cos_sin_grad_reference,
)
from torchfast.triton import unavailable_reason

_ROWS = 4  # rows per program: with D = 128, 4 x 64 pairs = 256 lanes, two loads of 16 bytes per thread
_BLOCK_PASS = 64  # pass-through features copied per step (partial rotary)


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, rows, s1, s2, xs0, xs1, xs2, os0, os1, os2, cs0, cs1, cs2,
                 D, R, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_PASS: tl.constexpr,
                 INTERLEAVED: tl.constexpr, TRANSPOSE: tl.constexpr, F64: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < rows
    i2 = r % s2
    t = r // s2
    i1 = t % s1
    i0 = t // s1
    xo = (i0 * xs0 + i1 * xs1 + i2 * xs2)[:, None]
    oo = (i0 * os0 + i1 * os1 + i2 * os2)[:, None]
    co = (i0 * cs0 + i1 * cs1 + i2 * cs2)[:, None]
    h = R // 2
    j = tl.arange(0, BLOCK_H)
    if INTERLEAVED:  # pairs (2j, 2j + 1)
        p1 = 2 * j
        p2 = 2 * j + 1
    else:  # pairs (j, j + R/2)
        p1 = j
        p2 = j + h
    m = rmask[:, None] & (j < h)[None, :]
    x1 = tl.load(x_ptr + xo + p1[None, :], mask=m, other=0.0)
    x2 = tl.load(x_ptr + xo + p2[None, :], mask=m, other=0.0)
    c1 = tl.load(cos_ptr + co + p1[None, :], mask=m, other=0.0)
    c2 = tl.load(cos_ptr + co + p2[None, :], mask=m, other=0.0)
    s1_ = tl.load(sin_ptr + co + p1[None, :], mask=m, other=0.0)
    s2_ = tl.load(sin_ptr + co + p2[None, :], mask=m, other=0.0)
    if not F64:  # fp32 math for every other dtype; bf16/fp16 rounded once on store
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        c1 = c1.to(tl.float32)
        c2 = c2.to(tl.float32)
        s1_ = s1_.to(tl.float32)
        s2_ = s2_.to(tl.float32)
    if TRANSPOSE:
        o1 = x1 * c1 + x2 * s2_
        o2 = x2 * c2 - x1 * s1_
    else:
        o1 = x1 * c1 - x2 * s1_
        o2 = x2 * c2 + x1 * s2_
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + oo + p1[None, :], o1.to(ty), mask=m)
    tl.store(out_ptr + oo + p2[None, :], o2.to(ty), mask=m)
    for start in range(R, D, BLOCK_PASS):  # partial rotary: the rest passes through
        p = start + tl.arange(0, BLOCK_PASS)
        mp = rmask[:, None] & (p < D)[None, :]
        tl.store(out_ptr + oo + p[None, :], tl.load(x_ptr + xo + p[None, :], mask=mp), mask=mp)


def _dims(x: torch.Tensor, out: torch.Tensor, cs: torch.Tensor):
    """Leading dimensions of x (size-1 ones dropped, contiguous neighbours merged) as (size, x stride,
    out stride, cos stride) lists; cs is cos/sin unsqueezed, broadcastable to x."""
    off = x.dim() - cs.dim()
    dims: list[list[int]] = []
    for d in range(x.dim() - 1):
        n = x.shape[d]
        if n == 1:
            continue
        c = cs.stride(d - off) if d >= off and cs.shape[d - off] != 1 else 0
        last = dims[-1] if dims else None
        if last and last[1] == x.stride(d) * n and last[2] == out.stride(d) * n and last[3] == c * n:
            dims[-1] = [dims[-1][0] * n, x.stride(d), out.stride(d), c]
        else:
            dims.append([n, x.stride(d), out.stride(d), c])
    return dims


def _launch(x: torch.Tensor, cos_u: torch.Tensor, sin_u: torch.Tensor, interleaved: bool,
            transpose: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    unit = x.shape[-1] == 1 or (x.stride(-1) == 1 and out.stride(-1) == 1)
    xs = x if unit else x.contiguous()
    work = out if unit else torch.empty_like(xs)
    c, s = cos_u, sin_u
    dims = _dims(xs, work, c)
    if len(dims) > 3:  # rare: more leading dimensions than the kernel walks; expand cos/sin instead
        lead = list(x.shape[:-1])
        xs, work = xs.contiguous(), torch.empty(x.shape, dtype=x.dtype, device=x.device)
        c = c.expand(lead + [c.shape[-1]]).contiguous()
        s = s.expand(lead + [s.shape[-1]]).contiguous()
        dims = _dims(xs, work, c)
    dims = [[1, 0, 0, 0]] * (3 - len(dims)) + dims
    rows = xs.numel() // xs.shape[-1]
    r = c.shape[-1]
    grid = (triton.cdiv(rows, _ROWS),)
    wrap_triton(_rope_kernel)[grid](
        xs, work, c, s, rows, dims[1][0], dims[2][0],
        dims[0][1], dims[1][1], dims[2][1],  # x strides
        dims[0][2], dims[1][2], dims[2][2],  # out strides
        dims[0][3], dims[1][3], dims[2][3],  # cos/sin strides
        xs.shape[-1], r, ROWS=_ROWS,
        BLOCK_H=max(triton.next_power_of_2(r // 2), 1), BLOCK_PASS=_BLOCK_PASS, INTERLEAVED=interleaved,
        TRANSPOSE=transpose, F64=x.dtype == torch.float64)
    if work is not out:
        out.copy_(work)
    return out


def _apply(a, b, cos, sin, unsqueeze_dim, interleaved, transpose, op, an, bn):
    check_args(op, a, b, cos, sin, unsqueeze_dim, an, bn)
    for name, t in ((an, a), (bn, b), ("cos", cos), ("sin", sin)):
        if t.device != a.device:
            raise RuntimeError(f"torchfast.{op}: '{an}' is on {a.device} but '{name}' is on {t.device}; "
                               "they must be on the same device")
        why = unavailable_reason(t.device.type)
        if why:
            raise RuntimeError(f"torchfast.{op} (triton): argument '{name}' is on {t.device}: {why}")
    p = unsqueeze_dim + cos.dim() + 1 if unsqueeze_dim < 0 else unsqueeze_dim
    if cos.stride() != sin.stride() or (cos.shape[-1] > 1 and cos.stride(-1) != 1):
        cos, sin = cos.contiguous(), sin.contiguous()
    cos_u, sin_u = cos.unsqueeze(p), sin.unsqueeze(p)
    return _launch(a, cos_u, sin_u, interleaved, transpose), _launch(b, cos_u, sin_u, interleaved, transpose)


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1,
             interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot) by `_rope_kernel` (not differentiable: use `rope`). Arguments as torchfast.rope."""
    return _apply(q, k, cos, sin, unsqueeze_dim, interleaved, False, "rope", "q", "k")


def rope_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             unsqueeze_dim: int = 1, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q and k: the transposed rotation (by -sin for RoPE's cos/sin)."""
    return _apply(grad_q, grad_k, cos, sin, unsqueeze_dim, interleaved, True, "rope_backward", "grad_q",
                  "grad_k")


rope_triton = triton_op("torchfast::rope_triton", rope_fwd, mutates_args=())
rope_backward_triton = triton_op("torchfast::rope_backward_triton", rope_bwd, mutates_args=())


def _setup(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, interleaved = inputs
    ctx.kw = {"unsqueeze_dim": unsqueeze_dim, "interleaved": interleaved}
    ctx.cs_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.cs_grad else ()))


def _backward(ctx, grad_q, grad_k):
    cos, sin, *qk = ctx.saved_tensors
    grad_q = torch.zeros_like(qk[0] if qk else grad_k) if grad_q is None else grad_q
    dq, dk = torch.ops.torchfast.rope_backward_triton(grad_q, grad_k, cos, sin, **ctx.kw)
    dc = ds = None
    if ctx.cs_grad:
        dc, ds = rope_cos_sin_grad_reference(grad_q, grad_k, *qk, cos, sin, **ctx.kw)
    return dq, dk, dc, ds, None, None


def _setup_bwd(ctx, inputs, output):
    *tensors, unsqueeze_dim, interleaved = inputs
    ctx.kw = {"unsqueeze_dim": unsqueeze_dim, "interleaved": interleaved}
    ctx.save_for_backward(*tensors)


def _backward_bwd(ctx, g_dq, g_dk):
    """Double backward through the reference's vector-Jacobian product (rarely used)."""
    grad_q, grad_k, cos, sin = ctx.saved_tensors
    g_dq = torch.zeros_like(grad_q) if g_dq is None else g_dq
    g_dk = torch.zeros_like(grad_k) if g_dk is None else g_dk
    _, vjp = torch.func.vjp(lambda *a: rope_backward_reference(*a, **ctx.kw), grad_q, grad_k, cos, sin)
    return (*vjp((g_dq, g_dk)), None, None)


rope_triton.register_autograd(_backward, setup_context=_setup)
rope_backward_triton.register_autograd(_backward_bwd, setup_context=_setup_bwd)
_library.register_autocast_casting("torchfast::rope_triton", autocast_args)  # the native rule
_library.register_autocast_same_dtype("torchfast::rope_backward_triton")


def rope(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """torchfast.rope with the Triton kernel, differentiable: what impl="triton" runs."""
    return torch.ops.torchfast.rope_triton(q, k, cos, sin, unsqueeze_dim, interleaved)
