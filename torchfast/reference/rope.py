"""Reference rotary position embedding (RoPE; Su et al. 2021, "RoFormer"), pure PyTorch, differentiable,
exact in float64: what the native ops (torchfast/ops/rope.py) and the Triton kernels
(torchfast/triton/rope.py) are tested against.

For one head vector x of width D and cos/sin rows of width R (R even, R <= D):

    x_rot[:R] = x[:R] * cos + rotate(x[:R]) * sin          x_rot[R:] = x[R:]   (partial rotary)

with rotate the layout's quarter turn of each pair:
    rotate-half (transformers' `rotate_half`, Llama/NeoX): pairs (i, i + R/2),  rotate(x) = cat(-x2, x1)
    interleaved (GPT-J, `rotate_every_two`):               pairs (2i, 2i + 1),
        rotate(x)[2i:2i+2] = (-x[2i+1], x[2i])

cos/sin are broadcast to x as transformers' `apply_rotary_pos_emb` does: `cos.unsqueeze(unsqueeze_dim)`
(1 for [B, H, T, D] with cos [B, T, R]; 2 for [B, T, H, D]).

rotate is a linear map with rotate^T = -rotate, so the transposed map (the backward with respect to x) is

    dx[:R] = g[:R] * cos - rotate(g[:R] * sin)              dx[R:] = g[R:]

which, for the cos/sin of RoPE (both members of a pair share one angle), is the rotation by -sin:
g * cos + rotate(g) * (-sin). The gradients of cos and sin are sums over the broadcast dimensions of
g * x[:R] and g * rotate(x[:R]).
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The quarter turn of every pair of the last dimension (see the module docstring)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
           transpose: bool) -> torch.Tensor:
    r = cos.shape[-1]
    xr = x[..., :r]
    if transpose:
        out = xr * cos - rotate(xr * sin, interleaved)
    else:
        out = xr * cos + rotate(xr, interleaved) * sin
    out = out.to(x.dtype)
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                   unsqueeze_dim: int = 1, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot), in the dtypes of q and k; the math in the promoted dtype of x and cos (float32
    for bfloat16 q with float32 cos). Differentiable in all four inputs."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _apply(q, cos, sin, interleaved, False), _apply(k, cos, sin, interleaved, False)


def rope_backward_reference(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            *, unsqueeze_dim: int = 1,
                            interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q and k given those of q_rot and k_rot: the transposed rotation."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _apply(grad_q, cos, sin, interleaved, True), _apply(grad_k, cos, sin, interleaved, True)


def rope_cos_sin_grad_reference(grad_q, grad_k, q, k, cos, sin, *, unsqueeze_dim: int = 1,
                                interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_cos, grad_sin) in the dtypes of cos and sin: sums over the dimensions cos and sin are
    broadcast along of g * x[:R] and g * rotate(x[:R]), for (g, x) = (grad_q, q) and (grad_k, k)."""
    r = cos.shape[-1]
    shape = cos.unsqueeze(unsqueeze_dim).shape
    acc = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), torch.float32)
    grad_cos = torch.zeros(shape, dtype=acc, device=cos.device)
    grad_sin = torch.zeros(shape, dtype=acc, device=cos.device)
    for g, x in ((grad_q, q), (grad_k, k)):
        g, x = g[..., :r].to(acc), x[..., :r].to(acc)
        grad_cos = grad_cos + (g * x).sum_to_size(shape)
        grad_sin = grad_sin + (g * rotate(x, interleaved)).sum_to_size(shape)
    return grad_cos.squeeze(unsqueeze_dim).to(cos.dtype), grad_sin.squeeze(unsqueeze_dim).to(sin.dtype)


# ---- argument checks shared by the public function, the fake kernels and the Triton launchers ---------
# The words of the C++ checks (csrc/ops/rope/rope.h), so every implementation refuses alike.

REDUCED = (torch.bfloat16, torch.float16)


def check_args(op: str, a, b, cos, sin, unsqueeze_dim, an: str, bn: str, dtypes: bool = True) -> None:
    """Raise unless the arguments are what the kernels take; `dtypes=False` (under autocast, whose rule
    casts them) leaves the dtypes out."""
    for name, t in ((an, a), (bn, b), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"torchfast.{op}: argument '{name}' must be a Tensor, got {type(t).__name__}")
    if dtypes:
        _check_dtypes(op, a, b, cos, sin, an, bn)
    _check_shapes(op, a, b, cos, sin, unsqueeze_dim, an, bn)


def _check_dtypes(op: str, a, b, cos, sin, an: str, bn: str) -> None:
    if b.dtype != a.dtype:
        raise TypeError(f"torchfast.{op}: '{an}' has dtype {a.dtype} but '{bn}' has dtype {b.dtype}; "
                        "they must match")
    if sin.dtype != cos.dtype:
        raise TypeError(f"torchfast.{op}: 'cos' has dtype {cos.dtype} but 'sin' has dtype {sin.dtype}; "
                        "they must match")
    reduced = a.dtype in REDUCED
    if cos.dtype != a.dtype and not (reduced and cos.dtype == torch.float32):
        raise TypeError(f"torchfast.{op}: 'cos' and 'sin' have dtype {cos.dtype} but '{an}' has dtype "
                        f"{a.dtype}; "
                        f"they must have {an}'s dtype" + (" or float32" if reduced else ""))


def _check_shapes(op: str, a, b, cos, sin, unsqueeze_dim, an: str, bn: str) -> None:
    if tuple(cos.shape) != tuple(sin.shape):
        raise RuntimeError(f"torchfast.{op}: 'cos' has shape {list(cos.shape)} but 'sin' has shape "
                           f"{list(sin.shape)}; they must match")
    if not isinstance(unsqueeze_dim, int) or isinstance(unsqueeze_dim, bool):
        raise TypeError(f"torchfast.{op}: unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    if cos.dim() == 0:
        raise RuntimeError(f"torchfast.{op}: argument 'cos' is 0-dimensional; its last dimension holds the R "
                           "rotated features")
    n = cos.dim() + 1
    p = unsqueeze_dim + n if unsqueeze_dim < 0 else unsqueeze_dim
    if not 0 <= p <= cos.dim() - 1:
        raise ValueError(f"torchfast.{op}: unsqueeze_dim={unsqueeze_dim} is out of range for 'cos' of "
                         f"{cos.dim()} dimensions; cos.unsqueeze(unsqueeze_dim) must keep the features last, "
                         "so it must be in "
                         f"[{-n}, {cos.dim() - 1}]")
    r = cos.shape[-1]
    if r % 2:
        raise ValueError(f"torchfast.{op}: 'cos' has {r} features (its last dimension); the rotated features "
                         "come in pairs, so it must be even")
    cos_u = tuple(cos.unsqueeze(p).shape)
    for name, x in ((an, a), (bn, b)):
        ok = x.dim() >= len(cos_u) and x.shape[-1] >= r
        ok = ok and all(c == 1 or c == s for c, s in zip(cos_u[:-1], x.shape[x.dim() - len(cos_u):-1]))
        if not ok:
            raise RuntimeError(f"torchfast.{op}: 'cos' unsqueezed to {list(cos_u)} does not broadcast to "
                               f"'{name}' of shape {list(x.shape)}: its leading dimensions must be 1 or "
                               f"equal to {name}'s, and its last ({r}, the rotated features) at most "
                               f"{name}'s head dimension")


def autocast_args(q, k, cos, sin, *args, **kwargs):
    """The autocast rule of the rope ops (native and Triton): see torchfast/ops/rope.py, section autocast."""
    if k.dtype != q.dtype:
        common = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(common), k.to(common)
    if cos.dtype != q.dtype and not (q.dtype in REDUCED and cos.dtype == torch.float32):
        target = torch.float32 if q.dtype in REDUCED else q.dtype
        cos, sin = cos.to(target), sin.to(target)
    elif sin.dtype != cos.dtype:
        sin = sin.to(cos.dtype)
    return (q, k, cos, sin, *args), kwargs
