"""LayerNorm (Ba, Kiros & Hinton 2016) over the last dimension.

    m = mean(x),  r = 1 / sqrt(mean((x - m)^2) + eps)   (biased variance, as torch)
    y = (x - m) * r * w + b

Backward, with xc = x - m, gw = grad_y * w and n the row length:
    dx = r * gw - r * sum(gw) / n - xc * r^3 * sum(gw * xc) / n
    dw = sum over rows of grad_y * xc * r,   db = sum over rows of grad_y   (fp32 accumulation)

Saves x, the per-row mean and rstd (fp32) and the weight (a parameter); backward runs the
`torchfast::layer_norm_backward` op. bf16/fp16 x with fp32 weight and bias is accepted as it is
(see torchfast/reference/_norm.py).

The reference, backward formula and autocast dtype rule are in torchfast/reference/layer_norm.py.
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.ops import _norm
from torchfast.reference.layer_norm import (
    layer_norm_autocast_args,
    layer_norm_backward_reference,
    layer_norm_reference,
    layer_norm_stats,
)

SCHEMAS = {
    "layer_norm": "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward": "(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
    "Tensor rstd) -> (Tensor, Tensor?, Tensor?)",
}


_library.define_fallback(
    SCHEMAS, {"layer_norm": layer_norm_stats, "layer_norm_backward": layer_norm_backward_reference}
)


@_library.register_fake("torchfast::layer_norm")
def _layer_norm_fake(x, weight, bias, eps):
    _norm.check_args("layer_norm", x, eps, {"weight": weight, "bias": bias})
    return _norm.rows_contiguous(x), _norm.empty_stats(x), _norm.empty_stats(x)


@_library.register_fake("torchfast::layer_norm_backward")
def _layer_norm_backward_fake(grad_out, x, weight, bias, mean, rstd):
    torch._check(grad_out.shape == x.shape, lambda: "torchfast.layer_norm_backward: 'grad_out' has shape "
                 f"{tuple(grad_out.shape)} but 'x' has shape {tuple(x.shape)}; they must match")
    return (_norm.rows_contiguous(x), None if weight is None else torch.empty_like(weight),
            None if bias is None else torch.empty_like(bias))


def _setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    # bias is kept only for its presence and dtype (the op's db); it is a parameter, no new memory.
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.set_materialize_grads(False)  # mean/rstd get a gradient only from a double backward


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx = dw = db = None
    if grad_y is not None:
        dx, dw, db = torch.ops.torchfast.layer_norm_backward(grad_y, x, weight, bias, mean, rstd)
    if grad_mean is not None:  # d mean / dx_j = 1 / n
        dx = _norm.add_grad(dx, (grad_mean / x.shape[-1]).unsqueeze(-1).expand(x.shape), x.dtype)
    if grad_rstd is not None:
        centered = x.to(mean.dtype) - mean.unsqueeze(-1)
        dx = _norm.add_grad(dx, _norm.rstd_grad_term(grad_rstd, rstd, centered), x.dtype)
    return dx, dw, db, None


def _setup_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _backward_bwd(ctx, grad_dx, grad_dw, grad_db):
    """Double backward: gradients for (grad_out, x, weight, bias, mean, rstd)."""
    return _norm.vjp_backward(layer_norm_backward_reference, ctx.saved_tensors, (grad_dx, grad_dw, grad_db))


# C++ when _C is built (csrc/ops/layer_norm/layer_norm_autograd.cpp); Python for the _C-less fallback.
_library.register_autograd_fallback("torchfast::layer_norm", _backward, _setup)
torch.library.register_autograd("torchfast::layer_norm_backward", _backward_bwd, setup_context=_setup_bwd)


_norm.register_autocast("torchfast::layer_norm", layer_norm_autocast_args)
_library.register_autocast_same_dtype("torchfast::layer_norm_backward")


def _sample_inputs(device, dtype):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    param = lambda n, dt=dtype: torch.randn(n, device=device, dtype=dt) * 0.5 + 1  # noqa: E731
    samples = [
        ((make(3, 5), param(5), param(5)), {"eps": 1e-5}),
        ((make(4, 37), None, None), {"eps": 1e-5}),
        ((make(2, 3, 70) * 3 + 5, param(70), param(70)), {"eps": 1e-5}),  # non-zero mean
        ((make(1), param(1), param(1)), {"eps": 1e-5}),
        ((make(6, 40)[:, ::2], param(20), None), {"eps": 1e-6}),  # strided rows, weight only
        ((make(0, 8), param(8), param(8)), {"eps": 1e-5}),
    ]
    if dtype in _norm.LOW:  # AMP: low-precision activations, fp32 weight and bias
        samples.append(((make(5, 33), param(33, torch.float32), param(33, torch.float32)), {"eps": 1e-5}))
    return samples


def _triton_layer_norm(x, weight=None, bias=None, *, eps=1e-5):
    from torchfast.triton.layer_norm import layer_norm as triton_layer_norm  # imports Triton: only when chosen

    return triton_layer_norm(x, weight, bias, eps=eps)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


def _native_layer_norm(x, weight=None, bias=None, *, eps=1e-5):
    return torch.ops.torchfast.layer_norm(x, weight, bias, eps)[0]


SPEC = register(
    OpSpec(
        name="layer_norm",
        schemas=SCHEMAS,
        reference=layer_norm_reference,
        arg_names=("x", "weight", "bias"),
        impls=[
            Impl("native", _native_layer_norm, ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::layer_norm")),
            Impl("triton", _triton_layer_norm, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", layer_norm_reference, ("cpu", "cuda", "meta", "mps", "xpu", "xla"), auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               eps: float = 1e-5, impl: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Args:
        x: float32/float64/bfloat16/float16 tensor with a non-empty last dimension, any layout.
        weight, bias: optional 1-D tensors of x.shape[-1] elements, x's dtype or float32 (for bf16/fp16
            x); when both are given they share one dtype.
        eps: added to the (biased) variance, >= 0.
        impl: "auto" (default: the compiled kernel, else Triton), "native", "triton" or "reference";
            overrides `torchfast.use_impl(...)`.

    Returns y with x's shape and dtype, contiguous; matches torch.nn.functional.layer_norm over the last
    dimension. Differentiable in x, weight and bias; backward saves x and two fp32 values per row.
    """
    # Arguments that are absent stand in as x for the registry's checks, so each keeps its name.
    fn = select(SPEC, (x, x if weight is None else weight, x if bias is None else bias), impl).fn
    _norm.check_public_args("layer_norm", x, eps, {"weight": weight, "bias": bias})
    return fn(x, weight, bias, eps=eps)


SPEC.function = layer_norm


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only: LayerNormalization (opset 17; the dynamo exporter starts at 18),
# elementary ops below 17 for the TorchScript exporter and for float64.
from torchfast.export._tables import onnx_opset  # noqa: E402


def _layer_norm_onnx_18(x, weight, bias, eps):
    return _norm.onnx_layer_norm_17(onnx_opset(18), x, weight, bias, eps)


def _layer_norm_symbolic(g, x, weight, bias, eps):
    from torch.onnx import symbolic_helper

    return _norm.ts_layer_norm(g, x, weight, bias, symbolic_helper._maybe_get_const(eps, "f"))


SPEC.onnx_translations["layer_norm"] = {18: _layer_norm_onnx_18}
SPEC.onnx_symbolics["layer_norm"] = {9: _layer_norm_symbolic}
# --- end ONNX ---------------------------------------------------------------------------------------
