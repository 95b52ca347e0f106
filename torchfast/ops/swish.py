"""swish / SiLU: y = x * sigmoid(x)  (Ramachandran et al. 2017; Elfwing et al. 2017).

Derivatives, with s = sigmoid(x):
    dy/dx   = s * (1 + x * (1 - s))
    d2y/dx2 = s * (1 - s) * (2 + x * (1 - 2 s))

Backward saves only `x` (not sigmoid(x)), so a swish in a training graph keeps one tensor alive, and
runs the `torchfast::swish_backward` op, so compiled and exported backward graphs see the fused kernel.
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.reference.swish import swish_backward_reference, swish_reference

SCHEMAS = {
    "swish": "(Tensor x) -> Tensor",
    "swish_backward": "(Tensor grad_out, Tensor x) -> Tensor",
}


def _fallback_kernel(fn):
    """The reference as a kernel for the _C-less build: fp32 math for reduced types, like the C++."""

    def kernel(*args):
        low = args[-1].dtype in (torch.bfloat16, torch.float16)
        return torch.empty_like(args[-1]).copy_(fn(*(a.float() if low else a for a in args)))

    return kernel


_library.define_fallback(
    SCHEMAS,
    {"swish": _fallback_kernel(swish_reference), "swish_backward": _fallback_kernel(swish_backward_reference)},
)


# The kernels return torch.empty_like(x) (csrc/include/torchfast/checks.h, laid_out_like), so the
# fake kernels are exactly that: same shape, dtype, device and strides, symbolic shapes included.
@_library.register_fake("torchfast::swish")
def _swish_fake(x):
    return torch.empty_like(x)


@_library.register_fake("torchfast::swish_backward")
def _swish_backward_fake(grad_out, x):
    torch._check(
        grad_out.shape == x.shape,
        lambda: f"torchfast.swish_backward: 'grad_out' has shape {tuple(grad_out.shape)} but 'x' has shape "
        f"{tuple(x.shape)}; they must match",
    )
    return torch.empty_like(x)


# Autograd. With _C it is registered in C++ (csrc/ops/swish/swish_autograd.cpp: the Python kernel
# below costs ~7 us per call, more than the op on small tensors); without _C these Python rules, the
# same math, make the reference-backed ops differentiable.
def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.torchfast.swish_backward(grad_out, x)


def _setup_context_bwd(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_bwd(ctx, grad):
    """Double backward: d/d(grad_out) is swish_backward again, d/dx = grad * grad_out * swish''(x)."""
    grad_out, x = ctx.saved_tensors
    s = torch.sigmoid(x)
    d2 = s * (1 - s) * (2 + x * (1 - 2 * s))
    return torch.ops.torchfast.swish_backward(grad, x), grad * grad_out * d2


_library.register_autograd_fallback("torchfast::swish", _backward, _setup_context)
_library.register_autograd_fallback("torchfast::swish_backward", _backward_bwd, _setup_context_bwd)
_library.register_autocast_same_dtype("torchfast::swish")
_library.register_autocast_same_dtype("torchfast::swish_backward")


def _triton_swish(x):
    from torchfast.triton.swish import swish as triton_swish

    return triton_swish(x)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


def _sample_inputs(device, dtype):
    """(args, kwargs) pairs covering the shapes the kernels must get right."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 4  # noqa: E731
    return [
        ((make(3, 5),), {}),
        ((make(0, 7),), {}),
        ((make(()),), {}),
        ((make(1027),), {}),  # not a multiple of any vector width
        ((make(4, 6, 5)[:, ::2],), {}),  # strided view with gaps
        ((make(2, 3, 5, 4).to(memory_format=torch.channels_last),), {}),
        ((make(6, 4).t(),), {}),  # transposed: dense, not contiguous
    ]


SPEC = register(
    OpSpec(
        name="swish",
        schemas=SCHEMAS,
        reference=swish_reference,
        arg_names=("x",),
        impls=[
            Impl("native", lambda x: torch.ops.torchfast.swish(x), ("cpu", "cuda", "meta"),
                 unavailable=_library.native_unavailable("torchfast::swish")),
            Impl("triton", _triton_swish, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", swish_reference, ("cpu", "cuda", "meta", "mps", "xpu", "xla"), auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)


def swish(x: torch.Tensor, *, impl: str | None = None) -> torch.Tensor:
    """swish(x) = x * sigmoid(x), elementwise (also known as SiLU).

    Args:
        x: floating tensor (float32, float64, bfloat16, float16) of any shape and layout, on CPU or CUDA.
        impl: "auto" (default: the compiled kernel, else Triton), "native", "triton" or "reference";
            overrides `torchfast.use_impl(...)`.

    bf16/fp16 are computed in fp32 and rounded once. Differentiable; backward saves only `x`.
    """
    return select(SPEC, (x,), impl).fn(x)


SPEC.function = swish


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only, so any runtime runs the exported graph without torchfast. Keys are the
# first opset each function may be used for (the rule is in torchfast/export/_tables.py).
from torchfast.export._tables import onnx_opset  # noqa: E402


def _swish_onnx_sigmoid_mul(x):
    """Translation for torch.onnx.export(dynamo=True) below opset 24: x * Sigmoid(x)."""
    op = onnx_opset(18)
    return op.Mul(x, op.Sigmoid(x))


def _swish_onnx_swish(x):
    """Translation from opset 24, which defines Swish(x) = x * sigmoid(alpha * x); alpha=1 is swish."""
    return onnx_opset(24).Swish(x, alpha=1.0)


def _swish_symbolic(g, x):
    """Symbolic for torch.onnx.export(dynamo=False); that exporter stops at opset 20, before Swish."""
    return g.op("Mul", x, g.op("Sigmoid", x))


SPEC.onnx_translations["swish"] = {18: _swish_onnx_sigmoid_mul, 24: _swish_onnx_swish}
SPEC.onnx_symbolics["swish"] = {9: _swish_symbolic}
# --- end ONNX ---------------------------------------------------------------------------------------
