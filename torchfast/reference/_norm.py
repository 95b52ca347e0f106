"""What the normalization ops (rms_norm, add_rms_norm, layer_norm) share: argument checks that every
implementation gets, the dtype rules of mixed-precision weights, the autocast rule, and the plumbing
of autograd through the per-row statistics.

A normalization works on rows: the last dimension of x (n elements), every leading dimension flattened.
The forward ops also return the per-row statistics (rstd, and mean for layer_norm) in fp32 (fp64 for
float64 x); backward ops take them instead of recomputing. The statistics are differentiable outputs
(d rstd / dx is folded into dx when a gradient reaches them), which is what makes the double backward
of the backward ops exact: it is the vector-Jacobian product of the reference backward, taken with the
statistics as independent inputs, and autograd routes the part that flows into them back to x.

Used by the op modules (torchfast/ops/) and the Triton operators (torchfast/triton/) alike; their ONNX
translations are in torchfast/ops/_norm.py. register_autocast registers through torchfast/_library.py,
which imports neither of them.
"""

from __future__ import annotations

from typing import Callable

import torch

from torchfast import _library

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
                         f"finite); got {eps!r}")
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
