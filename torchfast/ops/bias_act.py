"""bias_act: y = act(x + bias), the bias broadcast over the last dimension; act is one of identity,
relu, gelu (erf), gelu_tanh, swish. The epilogue of a linear layer, in one pass over memory.

Backward (the `torchfast::bias_act_backward` op, one pass):
    dx = dy * act'(x + bias),   dbias = sum of dx over all leading dimensions (fp32 accumulation).

What is saved: `x` and `bias`, not the pre-activation x + bias. Saving the pre-activation would make
the forward write a second full-size tensor (eager `act(x + b)` does, which is much of its cost);
x is already there (for a linear layer it is the matmul output) and bias is a parameter that lives
anyway, so autograd keeps nothing new but x, and the backward recomputes x + bias for one add per
element, free in a memory-bound kernel.

Autocast: x is used in its own dtype (bf16/fp16 computed in fp32 inside, output in x's dtype); a bias
of another dtype (an fp32 parameter under bf16 autocast) is cast to x's dtype first, as torch's
autocast does for F.linear's bias, and its gradient flows back through that cast.
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.reference._activations import ACTS, check_act, compute_dtype
from torchfast.reference.bias_act import (
    bias_act_backward_reference,
    bias_act_double_backward,
    bias_act_reference,
)

SCHEMAS = {
    "bias_act": "(Tensor x, Tensor? bias, *, str act) -> Tensor",
    "bias_act_backward": "(Tensor grad_out, Tensor x, Tensor? bias, *, str act) -> (Tensor, Tensor)",
}


# -- the kernels of the build without _C: the reference in the kernels' precision and layouts -------


def _fallback_forward(x, bias, *, act):
    c = compute_dtype(x)
    y = bias_act_reference(x.to(c), None if bias is None else bias.to(c), act=act)
    out = torch.empty_like(x) if bias is None else x.new_empty(x.shape)
    return out.copy_(y)


def _fallback_backward(grad_out, x, bias, *, act):
    c = compute_dtype(x)
    dx, db = bias_act_backward_reference(
        grad_out.to(c), x.to(c), None if bias is None else bias.to(c), act=act
    )
    out = torch.empty_like(x) if bias is None else x.new_empty(x.shape)
    return out.copy_(dx), db.to(x.dtype if bias is None else bias.dtype)


_library.define_fallback(SCHEMAS, {"bias_act": _fallback_forward, "bias_act_backward": _fallback_backward})


# -- fake kernels: the layouts the C++ kernels produce (bias_act_cpu.cpp) --------------------------


def _check_bias_shape(x, bias, op):
    torch._check(
        x.dim() >= 1,
        lambda: (
            f"torchfast.{op}: 'x' is 0-dimensional, but a bias is added along its "
            "last dimension; pass bias=None or give x at least one dimension"
        ),
    )
    torch._check(
        bias.dim() == 1 and bias.shape[0] == x.shape[-1],
        lambda: (
            f"torchfast.{op}: argument 'bias' has shape {list(bias.shape)} but x's last dimension "
            f"is {x.shape[-1]}; bias must be 1-D with x.size(-1) elements"
        ),
    )


@_library.register_fake("torchfast::bias_act")
def _bias_act_fake(x, bias, *, act):
    check_act(act, "bias_act")
    if bias is None:
        return torch.empty_like(x)  # elementwise: x's dense layout, like swish
    _check_bias_shape(x, bias, "bias_act")
    return x.new_empty(x.shape)  # contiguous


@_library.register_fake("torchfast::bias_act_backward")
def _bias_act_backward_fake(grad_out, x, bias, *, act):
    check_act(act, "bias_act_backward")
    torch._check(
        grad_out.shape == x.shape,
        lambda: (
            f"torchfast.bias_act_backward: 'grad_out' has shape "
            f"{tuple(grad_out.shape)} but 'x' has shape {tuple(x.shape)}; they must match"
        ),
    )
    if bias is None:
        return torch.empty_like(x), x.new_empty((0,))
    _check_bias_shape(x, bias, "bias_act_backward")
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


# -- autograd -----------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, bias = inputs
    ctx.act = keyword_only_inputs["act"]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    dx, db = torch.ops.torchfast.bias_act_backward(grad_out, x, bias, act=ctx.act)
    return dx, (db if ctx.has_bias else None)


# With _C the forward op's autograd is C++ (csrc/ops/bias_act/bias_act_autograd.cpp, the same rule at
# the dispatcher's cost); this Python rule is for the build without _C. The backward op's autograd (the
# double backward, below) is Python in both.
_library.register_autograd_fallback("torchfast::bias_act", _backward, _setup_context)


def _setup_context_bwd(ctx, inputs, keyword_only_inputs, output):
    ctx.act = keyword_only_inputs["act"]
    ctx.save_for_backward(*inputs)


def _backward_bwd(ctx, grad_dx, grad_db):
    grad_out, x, bias = ctx.saved_tensors
    first = lambda g: torch.ops.torchfast.bias_act_backward(g, x, bias, act=ctx.act)[0]
    return bias_act_double_backward(first, ctx.act, grad_out, x, bias, grad_dx, grad_db)


torch.library.register_autograd(
    "torchfast::bias_act_backward", _backward_bwd, setup_context=_setup_context_bwd
)


def _autocast_bias_follows_x(x, bias, *, act):
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return (x, bias), {"act": act}


def _autocast_backward(grad_out, x, bias, *, act):
    return (grad_out, x, bias), {"act": act}


_library.register_autocast_casting("torchfast::bias_act", _autocast_bias_follows_x)
_library.register_autocast_casting("torchfast::bias_act_backward", _autocast_backward)


# -- registry entry and public function ----------------------------------------------------------------


def _triton_bias_act(x, bias, *, act):
    from torchfast.triton.bias_act import bias_act as triton_bias_act

    return triton_bias_act(x, bias, act=act)


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


def _sample_inputs(device, dtype):
    """(args, kwargs) pairs covering every activation and the shapes the kernels must get right."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 3
    return [
        ((make(4, 33), make(33)), {"act": "gelu"}),
        ((make(3, 5, 7), make(7)), {"act": "swish"}),
        ((make(1027), make(1027)), {"act": "gelu_tanh"}),  # one row, not a multiple of any vector width
        ((make(0, 7), make(7)), {"act": "relu"}),  # empty
        ((make(5, 16)[:, 3:11], make(8)), {"act": "identity"}),  # row view: read in place
        ((make(6, 4).t(), make(6)), {"act": "relu"}),  # transposed: copied to rows
        ((make(4, 6, 5)[:, ::2], None), {"act": "gelu"}),  # no bias, strided with gaps
        ((make(2, 3, 5, 4).to(memory_format=torch.channels_last), None), {"act": "swish"}),
        ((make(()), None), {"act": "gelu_tanh"}),
    ]


def _native(x, bias, *, act):
    return torch.ops.torchfast.bias_act(x, bias, act=act)


SPEC = register(
    OpSpec(
        name="bias_act",
        schemas=SCHEMAS,
        reference=bias_act_reference,
        arg_names=("x", "bias"),
        impls=[
            Impl(
                "native",
                _native,
                ("cpu", "cuda", "meta"),
                unavailable=_library.native_unavailable("torchfast::bias_act"),
            ),
            Impl("triton", _triton_bias_act, ("cuda", "cpu"), unavailable=_triton_unavailable),
            Impl("reference", bias_act_reference, ("cpu", "cuda", "meta", "mps", "xpu", "xla"), auto=False),
        ],
        sample_inputs=_sample_inputs,
    )
)


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, *, act: str, impl: str | None = None
) -> torch.Tensor:
    """y = act(x + bias), the bias added along the last dimension, in one fused pass.

    Args:
        x: floating tensor (float32, float64, bfloat16, float16) of any shape, on CPU or CUDA.
        bias: 1-D tensor of x.size(-1) elements and x's dtype, or None (then y = act(x), keeping x's
            layout). With a bias the output is contiguous.
        act: "identity", "relu", "gelu" (exact, erf), "gelu_tanh" (tanh approximation) or "swish".
        impl: "auto" (default), "native", "triton" or "reference"; overrides `torchfast.use_impl(...)`.

    bf16/fp16 are computed in fp32 and rounded once. Differentiable in x and bias; backward saves only
    x (and bias, a parameter that lives anyway) and sums the bias gradient in fp32.
    """
    check_act(act, "bias_act")
    tensors = (x,) if bias is None else (x, bias)
    spec_impl = select(SPEC, tensors, impl)
    # Plain checks (dynamo traces them; torch._check with a message closure it cannot). Skipped under the
    # TorchScript tracer, where sizes are traced tensors and comparing them warns: the op checks again.
    if bias is not None and not torch.jit.is_tracing():
        if x.dim() == 0:
            raise RuntimeError(
                "torchfast.bias_act: 'x' is 0-dimensional, but a bias is added along its last "
                "dimension; pass bias=None or give x at least one dimension"
            )
        if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            raise RuntimeError(
                f"torchfast.bias_act: argument 'bias' has shape {list(bias.shape)} but x's last "
                f"dimension is {x.shape[-1]}; bias must be 1-D with x.size(-1) elements"
            )
    return spec_impl.fn(x, bias, act=act)


SPEC.function = bias_act
__all__ = ["ACTS", "bias_act", "bias_act_backward_reference", "bias_act_reference"]


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only: Add for the bias, then the activation (torchfast/ops/_activations.py:
# Relu; Gelu from opset 20, Erf/Tanh decompositions below; Swish from 24, Sigmoid+Mul below).
from torchfast.export._tables import onnx_opset
from torchfast.ops._activations import LEGACY_OPSETS, ONNX_OPSETS, legacy_act, onnx_act


def _bias_act_translation(opset):
    def translate(x, bias, act="identity"):
        op = onnx_opset(opset)
        return onnx_act(op, x if bias is None else op.Add(x, bias), act, opset)

    return translate


def _bias_act_symbolic(opset):
    def symbolic(g, x, bias, act):
        from torch.onnx import symbolic_helper  # here, not at import: torchfast does not import torch.onnx

        act = symbolic_helper._parse_arg(act, "s")
        return legacy_act(g, x if symbolic_helper._is_none(bias) else g.op("Add", x, bias), act, opset)

    return symbolic


SPEC.onnx_translations["bias_act"] = {o: _bias_act_translation(o) for o in ONNX_OPSETS}
SPEC.onnx_symbolics["bias_act"] = {o: _bias_act_symbolic(o) for o in LEGACY_OPSETS}
# --- end ONNX ---------------------------------------------------------------------------------------
