"""Gated linear units (Shazeer 2020, "GLU Variants Improve Transformer"):

    swiglu(gate, up) = swish(gate) * up          geglu(gate, up) = gelu(gate) * up

Backward (the `*_backward` ops, one pass): d_gate = dy * up * act'(gate), d_up = dy * act(gate). Only
`gate` and `up` are saved: the activation and its derivative are recomputed in the backward pass, so
autograd keeps the two inputs and nothing else (eager `F.silu(gate) * up` also keeps silu(gate)).

Packed form: `swiglu(x)` with x of width 2H is swiglu(x[..., :H], x[..., H:]), the layout a fused
gate/up projection produces. It has its own ops (`swiglu_packed`, `swiglu_packed_backward`) whose
kernels read the halves in place and write the gradient of x as one [..., 2H] tensor, with no split
or concatenation copies; what is saved is x itself.

Autocast: inputs are used in their own dtype (bf16/fp16 computed in fp32 inside, output in that
dtype). When gate and up differ in dtype (a bf16 projection and an fp32 one), both are promoted to
their common dtype (torch.promote_types, e.g. bf16 + fp32 -> fp32) before the op: the result is never
less precise than either input. Outside autocast, differing dtypes are an error.
"""

from __future__ import annotations

import torch

from torchfast import _library
from torchfast._registry import Impl, OpSpec, register, select
from torchfast.reference._activations import act_fn, compute_dtype, gelu_act
from torchfast.reference.glu import (
    geglu_reference,
    glu_backward_reference,
    glu_double_backward,
    swiglu_reference,
)

SCHEMAS_SWIGLU = {
    "swiglu": "(Tensor gate, Tensor up) -> Tensor",
    "swiglu_backward": "(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)",
}
SCHEMAS_SWIGLU_PACKED = {
    "swiglu_packed": "(Tensor x) -> Tensor",
    "swiglu_packed_backward": "(Tensor grad_out, Tensor x) -> Tensor",
}
SCHEMAS_GEGLU = {
    "geglu": '(Tensor gate, Tensor up, *, str approximate="none") -> Tensor',
    "geglu_backward": '(Tensor grad_out, Tensor gate, Tensor up, *, str approximate="none") -> (Tensor, Tensor)',
}
SCHEMAS_GEGLU_PACKED = {
    "geglu_packed": '(Tensor x, *, str approximate="none") -> Tensor',
    "geglu_packed_backward": '(Tensor grad_out, Tensor x, *, str approximate="none") -> Tensor',
}


def _act(op: str, approximate: str = "none") -> str:
    return "swish" if op.startswith("swiglu") else gelu_act(approximate, op)


# -- the kernels of the build without _C ----------------------------------------------------------------


def _low(*ts):
    c = compute_dtype(ts[0])
    return [t.to(c) for t in ts]


def _fb_forward(act):
    def kernel(gate, up, **_):
        g, u = _low(gate, up)
        return torch.empty_like(gate).copy_(act_fn(act, g) * u)

    return kernel


def _fb_backward(act):
    def kernel(grad_out, gate, up, **_):
        dg, du = glu_backward_reference(*_low(grad_out, gate, up), act=act)
        return torch.empty_like(gate).copy_(dg), torch.empty_like(gate).copy_(du)

    return kernel


def _fb_packed_forward(act):
    def kernel(x, **_):
        g, u = _low(*x.chunk(2, dim=-1))
        return (act_fn(act, g) * u).to(x.dtype).contiguous()

    return kernel


def _fb_packed_backward(act):
    def kernel(grad_out, x, **_):
        dg, du = glu_backward_reference(*_low(grad_out, *x.chunk(2, dim=-1)), act=act)
        return torch.cat([dg, du], dim=-1).to(x.dtype)

    return kernel


def _fb_gelu(make):
    def kernel(*args, approximate="none"):
        return make(gelu_act(approximate, "geglu"))(*args)

    return kernel


_library.define_fallback(
    SCHEMAS_SWIGLU, {"swiglu": _fb_forward("swish"), "swiglu_backward": _fb_backward("swish")}
)
_library.define_fallback(
    SCHEMAS_SWIGLU_PACKED,
    {"swiglu_packed": _fb_packed_forward("swish"), "swiglu_packed_backward": _fb_packed_backward("swish")},
)
_library.define_fallback(
    SCHEMAS_GEGLU, {"geglu": _fb_gelu(_fb_forward), "geglu_backward": _fb_gelu(_fb_backward)}
)
_library.define_fallback(
    SCHEMAS_GEGLU_PACKED,
    {"geglu_packed": _fb_gelu(_fb_packed_forward), "geglu_packed_backward": _fb_gelu(_fb_packed_backward)},
)


# -- fake kernels: the layouts of glu_cpu.cpp ------------------------------------------------------------


def _check_pair(gate, up, op):
    torch._check(
        gate.shape == up.shape,
        lambda: (
            f"torchfast.{op}: 'gate' has shape {tuple(gate.shape)} but "
            f"'up' has shape {tuple(up.shape)}; they must match"
        ),
    )


def _half(x, op):
    torch._check(
        x.dim() >= 1,
        lambda: (
            f"torchfast.{op}: argument 'x' is 0-dimensional; a packed input holds "
            "the gate and up halves side by side along its last dimension"
        ),
    )
    torch._check_value(
        x.shape[-1] % 2 == 0,
        lambda: (
            f"torchfast.{op}: argument 'x' has an odd last dimension "
            f"({x.shape[-1]}); a packed input holds the gate and up halves side by side, so its "
            "width must be even"
        ),
    )
    return x.shape[-1] // 2


def _register_fakes(op, packed):
    if not packed:

        def fwd(gate, up, **kw):
            _act(op, **kw)
            _check_pair(gate, up, op)
            return torch.empty_like(gate)

        def bwd(grad_out, gate, up, **kw):
            _act(op, **kw)
            _check_pair(gate, up, op + "_backward")
            torch._check(
                grad_out.shape == gate.shape,
                lambda: (
                    f"torchfast.{op}_backward: 'grad_out' has shape "
                    f"{tuple(grad_out.shape)} but 'gate' has shape {tuple(gate.shape)}; they must match"
                ),
            )
            return torch.empty_like(gate), torch.empty_like(gate)
    else:

        def fwd(x, **kw):
            _act(op, **kw)
            h = _half(x, op)
            return x.new_empty((*x.shape[:-1], h))

        def bwd(grad_out, x, **kw):
            _act(op, **kw)
            h = _half(x, op + "_backward")
            torch._check(
                grad_out.shape == (*x.shape[:-1], h),
                lambda: (
                    f"torchfast.{op}_backward: 'grad_out' has "
                    f"shape {tuple(grad_out.shape)} but the output of a packed 'x' of shape {tuple(x.shape)} "
                    f"has shape {(*x.shape[:-1], h)}"
                ),
            )
            return x.new_empty(x.shape)

    _library.register_fake(f"torchfast::{op}", fwd)
    _library.register_fake(f"torchfast::{op}_backward", bwd)


# -- autograd ---------------------------------------------------------------------------------------------


def _register_autograd(op, packed):
    bwd_op = getattr(torch.ops.torchfast, op + "_backward")

    def setup(ctx, inputs, output, keyword_only_inputs=None):
        ctx.kw = dict(keyword_only_inputs or {})
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_out):
        return bwd_op(grad_out, *ctx.saved_tensors, **ctx.kw)

    def setup_bwd(ctx, inputs, output, keyword_only_inputs=None):
        ctx.kw = dict(keyword_only_inputs or {})
        ctx.save_for_backward(*inputs)

    if not packed:

        def backward_bwd(ctx, g_gate, g_up):
            grad_out, gate, up = ctx.saved_tensors
            return glu_double_backward(_act(op, **ctx.kw), grad_out, gate, up, g_gate, g_up)
    else:

        def backward_bwd(ctx, g_x):
            grad_out, x = ctx.saved_tensors
            gate, up = x.chunk(2, dim=-1)
            g_gate, g_up = (None, None) if g_x is None else g_x.chunk(2, dim=-1)
            d_go, d_gate, d_up = glu_double_backward(_act(op, **ctx.kw), grad_out, gate, up, g_gate, g_up)
            return d_go, torch.cat([d_gate, d_up], dim=-1)

    # With _C the forward ops' autograd is C++ (csrc/ops/glu/glu_autograd.cpp, the same rule at the
    # dispatcher's cost); the Python rule is for the build without _C. The backward ops' autograd (the
    # double backward) is Python in both.
    _library.register_autograd_fallback(f"torchfast::{op}", backward, setup)
    torch.library.register_autograd(f"torchfast::{op}_backward", backward_bwd, setup_context=setup_bwd)


def _autocast_promote(gate, up, **kw):
    if gate.dtype != up.dtype:
        common = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(common), up.to(common)
    return (gate, up), kw


def _autocast_as_is(*args, **kw):
    return args, kw


for _op, _packed in (("swiglu", False), ("swiglu_packed", True), ("geglu", False), ("geglu_packed", True)):
    _register_fakes(_op, _packed)
    _register_autograd(_op, _packed)
    _library.register_autocast_casting(f"torchfast::{_op}", _autocast_as_is if _packed else _autocast_promote)
    _library.register_autocast_casting(f"torchfast::{_op}_backward", _autocast_as_is)


# -- registry entries and public functions ------------------------------------------------------------


def _triton(name):
    def fn(*args, **kw):
        from torchfast.triton import glu as triton_glu

        return getattr(triton_glu, name)(*args, **kw)

    return fn


def _triton_unavailable(device_type: str, explicit: bool) -> str | None:
    from torchfast.triton import unavailable_reason

    return unavailable_reason(device_type)


def _samples_pair(kwargs_list):
    def sample_inputs(device, dtype):
        make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 3
        shapes = [
            lambda: (make(4, 33), make(4, 33)),
            lambda: (make(2, 3, 7), make(2, 3, 7)),
            lambda: (make(1027), make(1027)),  # not a multiple of any vector width
            lambda: (make(0, 7), make(0, 7)),
            lambda: (make(()), make(())),
            lambda: tuple(make(3, 2 * 19).chunk(2, dim=-1)),  # halves of a packed tensor: row views
            lambda: (make(4, 6, 5)[:, ::2], make(4, 3, 5)),  # strided with gaps, mixed layouts
            lambda: (
                make(2, 3, 5, 4).to(memory_format=torch.channels_last),
                make(2, 3, 5, 4).to(memory_format=torch.channels_last),
            ),
            lambda: (make(6, 4).t(), make(4, 6)),  # transposed gate, contiguous up
        ]
        return [(shape(), kwargs_list[i % len(kwargs_list)]) for i, shape in enumerate(shapes)]

    return sample_inputs


def _samples_packed(kwargs_list):
    def sample_inputs(device, dtype):
        make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 3
        shapes = [
            lambda: make(4, 66),
            lambda: make(2, 3, 14),
            lambda: make(2, 2054),  # H = 1027: not a multiple of any vector width
            lambda: make(0, 8),
            lambda: make(5, 40)[:, 4:36],  # row view with row stride 40: read in place
            lambda: make(6, 8).t(),  # last dimension not contiguous: copied
            lambda: make(2),
        ]
        return [((shape(),), kwargs_list[i % len(kwargs_list)]) for i, shape in enumerate(shapes)]

    return sample_inputs


_DEVICES_REF = ("cpu", "cuda", "meta", "mps", "xpu", "xla")


def _spec(name, schemas, reference, native, arg_names, samples, function):
    return register(
        OpSpec(
            name=name,
            schemas=schemas,
            reference=reference,
            arg_names=arg_names,
            impls=[
                Impl(
                    "native",
                    native,
                    ("cpu", "cuda", "meta"),
                    unavailable=_library.native_unavailable(f"torchfast::{name}"),
                ),
                Impl("triton", _triton(name), ("cuda", "cpu"), unavailable=_triton_unavailable),
                Impl("reference", reference, _DEVICES_REF, auto=False),
            ],
            sample_inputs=samples,
            function=function,
        )
    )


# The public functions check shapes in Python for messages in the caller's terms; the ops check again.
# Skipped under the TorchScript tracer, where sizes are traced tensors and comparing them warns.


def _check_packed_width(x, op):
    if torch.jit.is_tracing():
        return
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] % 2:
        width = (
            "0-dimensional"
            if isinstance(x, torch.Tensor) and x.dim() == 0
            else f"of odd width {x.shape[-1]}"
            if isinstance(x, torch.Tensor)
            else "not a Tensor"
        )
        raise ValueError(
            f"torchfast.{op}: with 'up' omitted, argument 'gate' is taken as a packed [..., 2H] "
            f"tensor holding the gate and up halves side by side (op {op}_packed, argument 'x'), "
            f"but it is {width}"
        )


def _check_same(gate, up, op):
    if not torch.jit.is_tracing() and gate.shape != up.shape:
        raise RuntimeError(
            f"torchfast.{op}: 'gate' has shape {tuple(gate.shape)} but 'up' has shape "
            f"{tuple(up.shape)}; they must match"
        )


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, impl: str | None = None) -> torch.Tensor:
    """swiglu(gate, up) = swish(gate) * up = gate * sigmoid(gate) * up, elementwise.

    Args:
        gate, up: floating tensors of the same shape, dtype and device.
        up: omitted (None): `gate` is one packed [..., 2H] tensor, split in half along the last
            dimension (gate first), as a fused gate/up projection produces; the result is [..., H].
        impl: "auto" (default), "native", "triton" or "reference"; overrides `torchfast.use_impl(...)`.

    bf16/fp16 are computed in fp32 and rounded once. Differentiable; backward saves only the inputs and
    recomputes the activation.
    """
    if up is None:
        impl_ = select(SWIGLU_PACKED, (gate,), impl)  # (its errors name the packed op and its argument 'x')
        _check_packed_width(gate, "swiglu")
        return impl_.fn(gate)
    impl_ = select(SWIGLU, (gate, up), impl)
    _check_same(gate, up, "swiglu")
    return impl_.fn(gate, up)


def geglu(
    gate: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none", impl: str | None = None
) -> torch.Tensor:
    """geglu(gate, up) = gelu(gate) * up, elementwise; `approximate` is "none" (erf) or "tanh" as in
    torch.nn.functional.gelu. Packed form, dtypes and `impl` as in `swiglu`."""
    gelu_act(approximate, "geglu")
    if up is None:
        impl_ = select(GEGLU_PACKED, (gate,), impl)
        _check_packed_width(gate, "geglu")
        return impl_.fn(gate, approximate=approximate)
    impl_ = select(GEGLU, (gate, up), impl)
    _check_same(gate, up, "geglu")
    return impl_.fn(gate, up, approximate=approximate)


SWIGLU = _spec(
    "swiglu",
    SCHEMAS_SWIGLU,
    swiglu_reference,
    lambda g, u: torch.ops.torchfast.swiglu(g, u),
    ("gate", "up"),
    _samples_pair([{}]),
    swiglu,
)
SWIGLU_PACKED = _spec(
    "swiglu_packed",
    SCHEMAS_SWIGLU_PACKED,
    swiglu_reference,
    lambda x: torch.ops.torchfast.swiglu_packed(x),
    ("x",),
    _samples_packed([{}]),
    swiglu,
)
_APPROX = [{"approximate": "none"}, {"approximate": "tanh"}]
GEGLU = _spec(
    "geglu",
    SCHEMAS_GEGLU,
    geglu_reference,
    lambda g, u, approximate="none": torch.ops.torchfast.geglu(g, u, approximate=approximate),
    ("gate", "up"),
    _samples_pair(_APPROX),
    geglu,
)
GEGLU_PACKED = _spec(
    "geglu_packed",
    SCHEMAS_GEGLU_PACKED,
    geglu_reference,
    lambda x, approximate="none": torch.ops.torchfast.geglu_packed(x, approximate=approximate),
    ("x",),
    _samples_packed(_APPROX),
    geglu,
)

__all__ = ["geglu", "geglu_reference", "glu_backward_reference", "swiglu", "swiglu_reference"]


# --- ONNX -------------------------------------------------------------------------------------------
# Standard-domain ONNX only: act(gate) * up with the activation of torchfast/ops/_activations.py
# (Gelu from opset 20, Swish from 24, decompositions below), and for the packed form a Split of the
# last dimension into two equal halves (`num_outputs` from opset 18, equal split before).
from torchfast.export._tables import onnx_opset
from torchfast.ops._activations import LEGACY_OPSETS, ONNX_OPSETS, legacy_act, onnx_act


def _glu_translation(name, packed, opset):
    def translate(*inputs, approximate="none"):
        op = onnx_opset(opset)
        gate, up = op.Split(inputs[0], axis=-1, num_outputs=2, _outputs=2) if packed else inputs
        return op.Mul(onnx_act(op, gate, _act(name, approximate), opset), up)

    return translate


def _glu_symbolic(name, packed, opset):
    def symbolic(g, *inputs):
        from torch.onnx import symbolic_helper  # here, not at import: torchfast does not import torch.onnx

        n = 1 if packed else 2
        approximate = symbolic_helper._parse_arg(inputs[n], "s") if len(inputs) > n else "none"
        if packed:
            extra = {"num_outputs_i": 2} if opset >= 18 else {}
            gate, up = g.op("Split", inputs[0], axis_i=-1, outputs=2, **extra)
        else:
            gate, up = inputs[:2]
        return g.op("Mul", legacy_act(g, gate, _act(name, approximate), opset), up)

    return symbolic


for _name, _packed, _spec in (
    ("swiglu", False, SWIGLU),
    ("swiglu_packed", True, SWIGLU_PACKED),
    ("geglu", False, GEGLU),
    ("geglu_packed", True, GEGLU_PACKED),
):
    _spec.onnx_translations[_name] = {o: _glu_translation(_name, _packed, o) for o in ONNX_OPSETS}
    _spec.onnx_symbolics[_name] = {o: _glu_symbolic(_name, _packed, o) for o in sorted({*LEGACY_OPSETS, 18})}
# --- end ONNX ---------------------------------------------------------------------------------------
