"""Rotary position embedding of q and k in one fused op: `torchfast.rope(q, k, cos, sin)`.

    q_rot = q * cos + rotate(q) * sin,   k_rot = k * cos + rotate(k) * sin

with cos/sin broadcast as `cos.unsqueeze(unsqueeze_dim)`: transformers' `apply_rotary_pos_emb`
(rotate-half layout; `interleaved=True`: GPT-J's `rotate_every_two`). The math, the partial rotary and
the backward are in torchfast/reference/rope.py. The kernels read q, k, cos and sin once and write
q_rot and k_rot once, with cos/sin read through their broadcast strides (never expanded); eager PyTorch
builds five temporaries per tensor (x * cos, the two halves' negation and concatenation, * sin, +).

The ops (torch.ops.torchfast.*):
    rope(q, k, cos, sin, *, unsqueeze_dim=1, interleaved=False) -> (q_rot, k_rot)
    rope_backward(grad_q, grad_k, cos, sin, *, unsqueeze_dim=1, interleaved=False) -> (dq, dk)
rope_backward is the transposed rotation; for the cos/sin of RoPE (the two members of a pair share an
angle) that is the rotation by -sin. Forward saves only cos and sin, plus q and k when cos or sin
requires grad (their gradients: sums over the broadcast dimensions, computed with plain ATen ops).
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.reference.rope import (
    REDUCED,
    autocast_args,
    check_args,
    rope_backward_reference,
    rope_cos_sin_grad_reference,
    rope_reference,
)

_OPTS = "*, int unsqueeze_dim=1, bool interleaved=False"
SCHEMAS = {
    "rope": f"(Tensor q, Tensor k, Tensor cos, Tensor sin, {_OPTS}) -> (Tensor, Tensor)",
    "rope_backward": f"(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, {_OPTS}) -> (Tensor, Tensor)",
}


# ---- kernels of the build without _C ----------------------------------------------------------------

def _fb_kernel(reference):
    def kernel(a, b, cos, sin, *, unsqueeze_dim=1, interleaved=False):
        with torch.no_grad():
            ra, rb = reference(a, b, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)
        return torch.empty_like(a).copy_(ra), torch.empty_like(b).copy_(rb)

    return kernel


_library.define_fallback(SCHEMAS, {"rope": _fb_kernel(rope_reference),
                                   "rope_backward": _fb_kernel(rope_backward_reference)})


# ---- fake kernels: the layouts of rope.h (empty_like of q and of k) -----------------------------------

@_library.register_fake("torchfast::rope")
def _rope_fake(q, k, cos, sin, *, unsqueeze_dim=1, interleaved=False):
    check_args("rope", q, k, cos, sin, unsqueeze_dim, "q", "k")
    return torch.empty_like(q), torch.empty_like(k)


@_library.register_fake("torchfast::rope_backward")
def _rope_backward_fake(grad_q, grad_k, cos, sin, *, unsqueeze_dim=1, interleaved=False):
    check_args("rope_backward", grad_q, grad_k, cos, sin, unsqueeze_dim, "grad_q", "grad_k")
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


# ---- autograd ---------------------------------------------------------------------------------------
# With _C the forward op's autograd is C++ (csrc/ops/rope/rope_autograd.cpp); this Python rule is the
# same for the build without _C. The backward op's autograd (double backward) is Python in both: the
# vector-Jacobian product of the reference backward (exact, rarely used).

def _setup(ctx, inputs, keyword_only_inputs, output):
    q, k, cos, sin = inputs
    ctx.kw = dict(keyword_only_inputs)
    ctx.cs_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.cs_grad else ()))


def _backward(ctx, grad_q, grad_k):
    cos, sin, *qk = ctx.saved_tensors
    dq, dk = torch.ops.torchfast.rope_backward(grad_q, grad_k, cos, sin, **ctx.kw)
    dc = ds = None
    if ctx.cs_grad:
        dc, ds = rope_cos_sin_grad_reference(grad_q, grad_k, *qk, cos, sin, **ctx.kw)
    return dq, dk, dc, ds


def _setup_bwd(ctx, inputs, keyword_only_inputs, output):
    ctx.kw = dict(keyword_only_inputs)
    ctx.save_for_backward(*inputs)


def _backward_bwd(ctx, g_dq, g_dk):
    grad_q, grad_k, cos, sin = ctx.saved_tensors
    g_dq = torch.zeros_like(grad_q) if g_dq is None else g_dq
    g_dk = torch.zeros_like(grad_k) if g_dk is None else g_dk
    _, vjp = torch.func.vjp(lambda *a: rope_backward_reference(*a, **ctx.kw), grad_q, grad_k, cos, sin)
    return vjp((g_dq, g_dk))


_library.register_autograd_fallback("torchfast::rope", _backward, _setup)
torch.library.register_autograd("torchfast::rope_backward", _backward_bwd, setup_context=_setup_bwd)


# ---- autocast ---------------------------------------------------------------------------------------
# q and k as they are (fp32 math inside, the output in their dtype); a q/k dtype mix is promoted to the
# common dtype. cos/sin are kept when the kernels take them (q's dtype, or float32 with bf16/fp16 q: the
# usual case, an fp32 rotary cache with bf16 activations) and cast otherwise: to float32 for bf16/fp16
# q (never less precise than they were, unless they were float64), to q's dtype for float32/float64 q.

_library.register_autocast_casting("torchfast::rope", autocast_args)
_library.register_autocast_same_dtype("torchfast::rope_backward")


# ---- registry and public function -------------------------------------------------------------------

def _native(q, k, cos, sin, *, unsqueeze_dim=1, interleaved=False):
    return torch.ops.torchfast.rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)


def _triton(q, k, cos, sin, **kwargs):
    from torchfast.triton.rope import rope as triton_rope  # imports Triton

    return triton_rope(q, k, cos, sin, **kwargs)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


def rope_cache(positions: torch.Tensor, dim: int, *, base: float = 10000.0, interleaved: bool = False,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for integer `positions` ([..., T]) and `dim` rotated features:
    angle[..., t, i] = positions[t] * base^(-2j / dim) for the pair j of feature i (i mod dim/2 in the
    rotate-half layout, i // 2 interleaved), as transformers' rotary embeddings build them. Returns
    ([..., T, dim], [..., T, dim]) in `dtype`, computed in float32 (float64 for float64)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=acc, device=positions.device) / dim)
    angles = positions.to(acc).unsqueeze(-1) * inv_freq
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _sample_inputs(device, dtype):
    """(args, kwargs), kept tiny (the conformance suite runs opcheck on each, gradcheck on the first
    two): GQA in both head layouts and both pair layouts; a transposed q with partial rotary over 35 pairs
    (a full vector step and a tail for every dtype) and float32 cos/sin for bf16/fp16; empty.
    cos/sin are random, not a RoPE cache, so the transposed rotation is checked in general."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    cs_dtype = torch.float32 if dtype in REDUCED else dtype

    def cs(*shape, dt=dtype):
        return (torch.randn(*shape, device=device, dtype=dt), torch.randn(*shape, device=device, dtype=dt))

    return [
        ((make(1, 2, 3, 8), make(1, 1, 3, 8), *cs(1, 3, 8)), {}),  # [B, H, T, D]
        # [B, T, H, D]
        ((make(1, 3, 2, 4), make(1, 3, 1, 4), *cs(3, 4)), {"unsqueeze_dim": 1, "interleaved": True}),
        ((make(1, 3, 2, 76).transpose(1, 2), make(1, 1, 3, 76), *cs(3, 70, dt=cs_dtype)),
         {"unsqueeze_dim": 0}),
        ((make(0, 2, 3, 8), make(0, 1, 3, 8), *cs(0, 3, 8)), {}),
    ]


_REF_DEVICES = ("cpu", "cuda", "meta", "mps", "xpu", "xla")

SPEC = register(
    OpSpec(
        name="rope",
        schemas=SCHEMAS,
        reference=rope_reference,
        arg_names=("q", "k", "cos", "sin"),
        impls=[
            Impl("native", _native, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::rope")),
            Impl("triton", _triton, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", rope_reference, _REF_DEVICES, auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)


def _autocast_on(x: torch.Tensor) -> bool:
    dev = x.device.type
    return dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, unsqueeze_dim: int = 1,
         interleaved: bool = False, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k (RoFormer), fused: `(q_rot, k_rot)`.

        x_rot[..., :R] = x[..., :R] * cos + rotate(x[..., :R]) * sin,    x_rot[..., R:] = x[..., R:]

    for x = q and x = k, with cos/sin broadcast as `cos.unsqueeze(unsqueeze_dim)`, R = cos.shape[-1],
    and rotate = transformers' `rotate_half` (pairs (i, i + R/2)) or, with `interleaved=True`, GPT-J's
    `rotate_every_two` (pairs (2i, 2i + 1)). This is `apply_rotary_pos_emb(q, k, cos, sin,
    unsqueeze_dim=unsqueeze_dim)` of transformers, plus partial rotary (R < head dim: the rest passes
    through unchanged, as Phi / GPT-NeoX with partial_rotary_factor < 1).

    Args:
        q, k: [..., D_q] and [..., D_k], same dtype (float32/float64/bfloat16/float16) and device, any
            layout; their head counts may differ (GQA/MQA): cos/sin just have to broadcast to each.
        cos, sin: same shape [..., R] (e.g. [B, T, R] or [T, R]), R even and at most D_q and D_k; dtype
            q's, or float32 when q is bfloat16/float16.
        unsqueeze_dim: where cos/sin get the head dimension: 1 for q of [B, H, T, D] with cos [B, T, R]
            (transformers' default), 2 for [B, T, H, D]; it must come before cos's last dimension.
        interleaved: GPT-J's pair layout instead of rotate-half.
        impl: "auto" (default), "native", "triton" or "reference"; overrides `torchfast.use_impl`.

    Returns q_rot and k_rot in the dtype and layout of q and k (math in float32; float64 for float64).
    With bfloat16 q and float32 cos this differs from the eager expression `q * cos + rotate_half(q) *
    sin`, which promotes to a float32 result: here the float32 result is rounded once to bfloat16.
    Differentiable in q and k (backward: the rotation by -sin, needing only cos and sin) and in cos and
    sin (their gradients are computed, and q and k saved, only when they require grad). Under autocast
    q/k keep their dtype and cos/sin are cast only where the kernels do not take them.
    """
    fn = select(SPEC, (q, k, cos, sin), impl).fn
    if not isinstance(interleaved, bool):
        raise TypeError(f"torchfast.rope: interleaved must be a bool, got {type(interleaved).__name__}")
    if not torch.jit.is_tracing():  # the op checks again; traced sizes would warn on every comparison
        check_args("rope", q, k, cos, sin, unsqueeze_dim, "q", "k", dtypes=not _autocast_on(q))
    return fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved)


SPEC.function = rope

__all__ = ["rope", "rope_backward_reference", "rope_cache", "rope_reference"]


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX: elementary ops at every opset, RotaryEmbedding from opset 23 where it applies
# (torchfast/ops/_rope_onnx.py).
from torchfast.ops import _rope_onnx as _onnx  # noqa: E402

SPEC.onnx_translations["rope"] = {_onnx.OPSET: _onnx.rope_onnx, _onnx.ROTARY_OPSET: _onnx.rope_onnx_23}
SPEC.onnx_symbolics["rope"] = {_onnx.LEGACY_OPSET: _onnx.rope_symbolic}
# --- end ONNX ---------------------------------------------------------------------------------------
