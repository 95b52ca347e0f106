"""RMSNorm (Zhang & Sennrich 2019) and its residual-add form, over the last dimension.

    rms_norm:      r = 1 / sqrt(mean(x^2) + eps),  y = x * r * w
    add_rms_norm:  h = x + residual,  y = rms_norm(h)  ->  (y, h)   (pre-norm transformer blocks)

Backward, with gw = grad_y * w and n the row length:
    dx = r * gw - x * r^3 * sum(gw * x) / n
    dw = sum over rows of grad_y * x * r            (fp32 accumulation, in w's dtype)
add_rms_norm's gradient for x and residual is that dx (of h) plus the gradient reaching h.

rms_norm saves x, the per-row rstd (fp32) and the weight (a parameter: no new memory); add_rms_norm
saves h instead of x and residual. Backward runs the `torchfast::rms_norm_backward` /
`add_rms_norm_backward` ops, so compiled and exported backward graphs see the fused kernels.

Mixed precision: bf16/fp16 x with an fp32 weight is accepted as it is (statistics and math in fp32,
output in x's dtype, weight gradient in fp32); see torchfast/reference/_norm.py for the autocast rule.

The references, backward formulas and autocast dtype rule are in torchfast/reference/rms_norm.py.
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.ops import _norm
from torchfast.reference.rms_norm import (
    add_rms_norm_autocast_args,
    add_rms_norm_backward_reference,
    add_rms_norm_reference,
    add_rms_norm_stats,
    rms_norm_autocast_args,
    rms_norm_backward_reference,
    rms_norm_reference,
    rms_norm_stats,
)

SCHEMAS = {
    "rms_norm": "(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_backward": "(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor?)",
}
ADD_SCHEMAS = {
    "add_rms_norm": "(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)",
    "add_rms_norm_backward": "(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor? weight, Tensor rstd) "
    "-> (Tensor, Tensor?)",
}


_library.define_fallback(
    {**SCHEMAS, **ADD_SCHEMAS},
    {
        "rms_norm": rms_norm_stats,
        "rms_norm_backward": rms_norm_backward_reference,
        "add_rms_norm": add_rms_norm_stats,
        "add_rms_norm_backward": add_rms_norm_backward_reference,
    },
)


# ---- fake kernels: outputs are contiguous rows (csrc/include/torchfast/norm.h) ----------------------

@_library.register_fake("torchfast::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _norm.check_args("rms_norm", x, eps, {"weight": weight})
    return _norm.rows_contiguous(x), _norm.empty_stats(x)


@_library.register_fake("torchfast::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, weight, rstd):
    torch._check(grad_out.shape == x.shape, lambda: "torchfast.rms_norm_backward: 'grad_out' has shape "
                 f"{tuple(grad_out.shape)} but 'x' has shape {tuple(x.shape)}; they must match")
    return _norm.rows_contiguous(x), None if weight is None else torch.empty_like(weight)


@_library.register_fake("torchfast::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps):
    _norm.check_args("add_rms_norm", x, eps, {"weight": weight})
    torch._check(residual.shape == x.shape, lambda: "torchfast.add_rms_norm: 'residual' has shape "
                 f"{tuple(residual.shape)} but 'x' has shape {tuple(x.shape)}; they must match")
    return _norm.rows_contiguous(x), _norm.rows_contiguous(x), _norm.empty_stats(x)


@_library.register_fake("torchfast::add_rms_norm_backward")
def _add_rms_norm_backward_fake(grad_out, grad_h, h, weight, rstd):
    torch._check(grad_out.shape == h.shape, lambda: "torchfast.add_rms_norm_backward: 'grad_out' has shape "
                 f"{tuple(grad_out.shape)} but 'h' has shape {tuple(h.shape)}; they must match")
    return _norm.rows_contiguous(h), None if weight is None else torch.empty_like(weight)


# ---- autograd ---------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.set_materialize_grads(False)  # rstd's gradient is None unless a double backward sends one


def _backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx = dw = None
    if grad_y is not None:
        dx, dw = torch.ops.torchfast.rms_norm_backward(grad_y, x, weight, rstd)
    if grad_rstd is not None:
        dx = _norm.add_grad(dx, _norm.rstd_grad_term(grad_rstd, rstd, x), x.dtype)
    return dx, dw, None


def _setup_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _backward_bwd(ctx, grad_dx, grad_dw):
    """Double backward: gradients for (grad_out, x, weight, rstd), rstd's flowing on to x."""
    return _norm.vjp_backward(rms_norm_backward_reference, ctx.saved_tensors, (grad_dx, grad_dw))


# The forward ops' autograd is C++ when _C is built (csrc/ops/rms_norm/rms_norm_autograd.cpp, the same
# rules without the per-call cost of a Python autograd kernel); these Python rules serve the _C-less
# fallback. The backward ops' autograd (their double backward) is Python in both cases.
_library.register_autograd_fallback("torchfast::rms_norm", _backward, _setup)
torch.library.register_autograd("torchfast::rms_norm_backward", _backward_bwd, setup_context=_setup_bwd)


def _setup_add(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.set_materialize_grads(False)


def _backward_add(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dw = grad_h, None
    if grad_y is not None:
        dh, dw = torch.ops.torchfast.add_rms_norm_backward(grad_y, grad_h, h, weight, rstd)
    if grad_rstd is not None:
        dh = _norm.add_grad(dh, _norm.rstd_grad_term(grad_rstd, rstd, h), h.dtype)
    # h = x + residual: both get dh (as torch's own add does, the same tensor for both).
    return dh, dh, dw, None


def _backward_add_bwd(ctx, grad_dh, grad_dw):
    return _norm.vjp_backward(add_rms_norm_backward_reference, ctx.saved_tensors, (grad_dh, grad_dw))


_library.register_autograd_fallback("torchfast::add_rms_norm", _backward_add, _setup_add)
torch.library.register_autograd("torchfast::add_rms_norm_backward", _backward_add_bwd,
                                setup_context=_setup_bwd)


# ---- autocast: activations as they are, weights cast only where the kernels would refuse them -----

_norm.register_autocast("torchfast::rms_norm", rms_norm_autocast_args)
_norm.register_autocast("torchfast::add_rms_norm", add_rms_norm_autocast_args)
_library.register_autocast_same_dtype("torchfast::rms_norm_backward")
_library.register_autocast_same_dtype("torchfast::add_rms_norm_backward")


# ---- registry and public functions ------------------------------------------------------------------

def _sample_inputs(device, dtype):
    """(args, kwargs) pairs covering what the kernels must get right: tails shorter than a vector,
    rows of one element, several leading dims, strided x, empty batch, no weight, fp32 weight."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    weight = lambda n: torch.randn(n, device=device, dtype=dtype) * 0.5 + 1  # noqa: E731
    samples = [
        ((make(3, 5), weight(5)), {"eps": 1e-6}),
        ((make(4, 37), None), {"eps": 1e-5}),
        ((make(2, 3, 70), weight(70)), {"eps": 1e-6}),
        ((make(1), weight(1)), {"eps": 1e-6}),
        ((make(6, 40)[:, ::2], weight(20)), {"eps": 1e-6}),  # strided rows
        ((make(0, 8), weight(8)), {"eps": 1e-6}),
    ]
    if dtype in _norm.LOW:  # AMP: low-precision activations, fp32 master weight
        samples.append(((make(5, 33), torch.randn(33, device=device)), {"eps": 1e-6}))
    return samples


def _add_sample_inputs(device, dtype):
    out = []
    for args, kwargs in _sample_inputs(device, dtype):
        x = args[0]
        out.append(((x, torch.randn_like(x), *args[1:]), kwargs))
    return out


def _native_rms_norm(x, weight=None, *, eps=1e-6):
    return torch.ops.torchfast.rms_norm(x, weight, eps)[0]


def _native_add_rms_norm(x, residual, weight=None, *, eps=1e-6):
    y, h, _ = torch.ops.torchfast.add_rms_norm(x, residual, weight, eps)
    return y, h


_REF_DEVICES = ("cpu", "cuda", "meta", "mps", "xpu", "xla")


def _triton_rms_norm(x, weight=None, *, eps=1e-6):
    from torchfast.triton.rms_norm import rms_norm as triton_rms_norm  # imports Triton: only when chosen

    return triton_rms_norm(x, weight, eps=eps)


def _triton_add_rms_norm(x, residual, weight=None, *, eps=1e-6):
    from torchfast.triton.rms_norm import add_rms_norm as triton_add_rms_norm

    return triton_add_rms_norm(x, residual, weight, eps=eps)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)

SPEC = register(
    OpSpec(
        name="rms_norm",
        schemas=SCHEMAS,
        reference=rms_norm_reference,
        arg_names=("x", "weight"),
        impls=[
            Impl("native", _native_rms_norm, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::rms_norm")),
            Impl("triton", _triton_rms_norm, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", rms_norm_reference, _REF_DEVICES, auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)

ADD_SPEC = register(
    OpSpec(
        name="add_rms_norm",
        schemas=ADD_SCHEMAS,
        reference=add_rms_norm_reference,
        arg_names=("x", "residual", "weight"),
        impls=[
            Impl("native", _native_add_rms_norm, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::add_rms_norm")),
            Impl("triton", _triton_add_rms_norm, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", add_rms_norm_reference, _REF_DEVICES, auto=False),
        ],
        sample_inputs=_add_sample_inputs,
    )
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float | None = 1e-6,
             impl: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension: y = x / sqrt(mean(x^2, -1) + eps) * weight.

    Args:
        x: float32/float64/bfloat16/float16 tensor, any shape with a non-empty last dimension and any
            layout (rows are made contiguous); on CPU or CUDA.
        weight: optional 1-D tensor of x.shape[-1] elements, x's dtype or float32 (for bf16/fp16 x).
        eps: added to the mean square; None means torch.finfo of the math type (as torch.nn.RMSNorm).
        impl: "auto" (default: the compiled kernel, else Triton), "native", "triton" or "reference";
            overrides `torchfast.use_impl(...)`.

    Returns y with x's shape and dtype, contiguous. Statistics in fp32 (fp64 for float64).
    Differentiable in x and weight; backward saves x and one fp32 value per row.
    """
    # An absent weight stands in as x for the registry's checks, so each argument keeps its name.
    fn = select(SPEC, (x, x if weight is None else weight), impl).fn
    eps = _norm.resolve_eps(eps, x)
    _norm.check_public_args("rms_norm", x, eps, {"weight": weight})
    return fn(x, weight, eps=eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, *,
                 eps: float | None = 1e-6, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm of pre-norm transformer blocks: returns (rms_norm(h), h) with
    h = x + residual, in one pass over memory.

    h is rounded to the activations' dtype before it is normalized, exactly like the unfused
    `h = x + residual; y = rms_norm(h, weight)`. x and residual must have the same shape and dtype
    (under torch.autocast they are promoted to a common dtype first, like torch's add).
    Backward saves h and one fp32 value per row (not x nor residual).
    """
    fn = select(ADD_SPEC, (x, residual, x if weight is None else weight), impl).fn
    eps = _norm.resolve_eps(eps, x)
    _norm.check_public_args("add_rms_norm", x, eps, {"weight": weight})
    if residual.shape != x.shape:
        raise RuntimeError(f"torchfast.add_rms_norm: 'residual' has shape {tuple(residual.shape)} but 'x' has "
                           f"shape {tuple(x.shape)}; they must match")
    return fn(x, residual, weight, eps=eps)


SPEC.function = rms_norm
ADD_SPEC.function = add_rms_norm


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only (see torchfast/export/_tables.py for the opset keys): RMSNormalization from
# opset 23, ReduceMean/Sqrt/Reciprocal/Mul below; add_rms_norm is an Add in front of the same.
from torchfast.export._tables import onnx_opset  # noqa: E402


def _rms_norm_onnx_18(x, weight, eps):
    return _norm.onnx_rms_norm_decomposed(onnx_opset(18), x, weight, eps)


def _rms_norm_onnx_23(x, weight, eps):
    return _norm.onnx_rms_norm_23(onnx_opset(23), x, weight, eps)


def _add_rms_norm_onnx(version, norm):
    def translation(x, residual, weight, eps):
        op = onnx_opset(version)
        h = op.Add(x, residual)
        y, rstd = norm(op, h, weight, eps, x.dtype)
        return y, h, rstd

    return translation


def _rms_norm_symbolic(g, x, weight, eps):
    from torch.onnx import symbolic_helper

    return _norm.ts_rms_norm(g, x, weight, symbolic_helper._maybe_get_const(eps, "f"))


def _add_rms_norm_symbolic(g, x, residual, weight, eps):
    from torch.onnx import symbolic_helper

    h = g.op("Add", x, residual)
    y, rstd = _norm.ts_rms_norm(g, h, weight, symbolic_helper._maybe_get_const(eps, "f"))
    return y, h, rstd


SPEC.onnx_translations["rms_norm"] = {18: _rms_norm_onnx_18, 23: _rms_norm_onnx_23}
SPEC.onnx_symbolics["rms_norm"] = {9: _rms_norm_symbolic}
ADD_SPEC.onnx_translations["add_rms_norm"] = {
    18: _add_rms_norm_onnx(18, _norm.onnx_rms_norm_decomposed),
    23: _add_rms_norm_onnx(23, _norm.onnx_rms_norm_23),
}
ADD_SPEC.onnx_symbolics["add_rms_norm"] = {9: _add_rms_norm_symbolic}
# --- end ONNX ---------------------------------------------------------------------------------------
