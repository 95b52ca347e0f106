"""`quantize` (torchao's quantize_) and `quantize_static` (the classic torch.ao.quantization flow)."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

import torchfast.nn as tfnn
from torchfast._util import dropped_log_records
from torchfast.compress._common import check_choice, check_module, fail, working_copy
from torchfast.export import _tables

MODES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")
STATIC_BACKENDS = ("x86", "fbgemm", "qnnpack")
INT4_GROUP_SIZE = 128

# Why int4_weight_only does not run on a CPU with torchao 0.18.0 (each tried on this machine):
INT4_CPU_REASON = (
    "torchao 0.18.0's Int4WeightOnlyConfig packs weights for GPU kernels only: the default 'plain' "
    "format needs the mslk kernel library (CUDA; 'Requires mslk >= 1.0.0'), 'tile_packed_to_4d' "
    "(tinygemm) needs CUDA and bfloat16 ('Torch not compiled with CUDA enabled'), and 'plain_int32' "
    "supports XPU/NPU ('Int4PlainInt32Tensor does not support device cpu'). torchao's "
    "IntxWeightOnlyConfig(weight_dtype=torch.int4) does run on CPU, but stores each 4-bit value in a "
    "byte, so it saves no more than int8_weight_only"
)


def _quiet_torchao_import():
    """torchao logs that its CUDA-only libraries fail to load on a CPU build, and torch logs a notice
    about one of torchao's Enum registrations: both on every import, neither about the model."""
    return dropped_log_records(["torchao", "torch.utils._pytree"], "Failed to load", "is an Enum subclass")


def _torchao():
    try:
        with _quiet_torchao_import():
            import torchao.quantization as q
    except ImportError as e:
        raise ImportError(f"torchfast.compress.quantize needs torchao ({e}); install the quant extra: "
                          "pip install 'torchfast[quant]'") from e
    return q


def _int_mm_onnx(a, b):
    """aten._int_mm (int8 x int8 -> int32, what torchao's int8_dynamic runs) as ONNX MatMulInteger, so
    that torchfast.export.onnx exports int8_dynamic models."""
    return _tables.onnx_opset(18).MatMulInteger(a, b)


_tables.EXTRA_TRANSLATIONS[torch.ops.aten._int_mm.default] = {18: _int_mm_onnx}


def _plain_float_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(w.data) is torch.Tensor and w.is_floating_point()


def quantize(model: nn.Module, *, mode: str = "int8_weight_only",
             filter_fn: Callable[[nn.Module, str], bool] | None = None, inplace: bool = False) -> nn.Module:
    """Quantize the linear layers of a model with torchao's `quantize_`.

    Covers nn.Linear and the linear layers inside torchfast modules (torchfast.nn.Linear, whose fused
    bias + activation epilogue keeps running after the quantized matmul; the projections of SwiGLU/GeGLU).

    Args:
        model: any nn.Module (float weights).
        mode: "int8_weight_only" (Int8WeightOnlyConfig: int8 weights, per-channel scales, float
            activations), "int8_dynamic" (Int8DynamicActivationInt8WeightConfig: int8 weights and
            activations quantized per call, int8 x int8 matmul), or "int4_weight_only"
            (Int4WeightOnlyConfig, group size 128, 'tile_packed_to_4d' format: CUDA and bfloat16 weights
            only; on CPU it raises NotImplementedError with the reason, see INT4_CPU_REASON).
        filter_fn: `filter_fn(module, qualified_name) -> bool` choosing layers among the float
            nn.Linear layers (the default takes all of them).
        inplace: quantize `model` itself; by default a deep copy is quantized and `model` is unchanged.

    Returns the quantized model: the same module tree, with weights that are torchao tensor subclasses.
    It saves with torch.save(state_dict) and exports with torchfast.export.onnx (int8_dynamic's int8
    matmul becomes ONNX MatMulInteger). Raises ValueError for a bad argument or when no layer is chosen.
    """
    original = check_module("quantize", model)
    check_choice("quantize", "mode", mode, MODES)
    if filter_fn is not None and not callable(filter_fn):
        raise fail("quantize", "filter_fn", f"must be callable as filter_fn(module, name), got "
                   f"{type(filter_fn).__name__}", TypeError)
    chosen = [(n, m) for n, m in original.named_modules()
              if _plain_float_linear(m) and (filter_fn is None or filter_fn(m, n))]
    if mode == "int4_weight_only" and chosen:  # with nothing chosen, the error below says so
        _check_int4(chosen)
        chosen = [(n, m) for n, m in chosen if m.in_features % INT4_GROUP_SIZE == 0]
    if not chosen:
        extra = f" with in_features divisible by {INT4_GROUP_SIZE} (the int4 group size)" \
            if mode == "int4_weight_only" else ""
        raise fail("quantize", "model", f"has nothing to quantize: no float nn.Linear layer{extra}"
                   f"{' passes filter_fn' if filter_fn is not None else ''}")
    q = _torchao()
    names = {n for n, _ in chosen}
    if mode == "int8_weight_only":
        config = q.Int8WeightOnlyConfig()
    elif mode == "int8_dynamic":
        config = q.Int8DynamicActivationInt8WeightConfig()
    else:
        config = q.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    model = working_copy(original, inplace)
    q.quantize_(model, config, filter_fn=lambda m, fqn: fqn in names and _plain_float_linear(m))
    return model


def _check_int4(chosen: list[tuple[str, nn.Module]]) -> None:
    devices = {m.weight.device.type for _, m in chosen}
    if devices - {"cuda"}:
        raise NotImplementedError(
            f"torchfast.compress.quantize: mode='int4_weight_only' cannot run on "
            f"{', '.join(sorted(devices - {'cuda'}))}: {INT4_CPU_REASON}. Use mode='int8_weight_only' or "
            "'int8_dynamic' on CPU, or move the model to a CUDA GPU in bfloat16.")
    dtypes = {m.weight.dtype for _, m in chosen}
    if dtypes != {torch.bfloat16}:
        raise fail("quantize", "model", f"has weights of dtype {sorted(map(str, dtypes))}; "
                   "mode='int4_weight_only' takes bfloat16 weights (model.to(torch.bfloat16))")


# ---------------------------------------------------------------------------------------------------
# the classic static flow


_ACTIVATIONS = {
    "relu": nn.ReLU, "identity": nn.Identity, "swish": tfnn.Swish,
    "gelu": lambda: tfnn.GELU("none"), "gelu_tanh": lambda: tfnn.GELU("tanh"),
}
_STATIC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _wrap(layer: nn.Module, tq) -> nn.Module:
    """QuantStub -> layer -> DeQuantStub: each layer quantizes its own input with the scale its
    observer saw, and everything around it (torchfast activations, norms) stays float. A torchfast
    Linear becomes a plain nn.Linear (which convert maps to the quantized kernel) followed by its
    activation as a torchfast module."""
    act = None
    if isinstance(layer, tfnn.Linear) and type(layer) is not nn.Linear:
        if layer.activation is not None:
            act = _ACTIVATIONS[layer.activation]()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        layer = plain
    block = nn.Sequential(tq.QuantStub(), layer, tq.DeQuantStub())
    return nn.Sequential(block, act) if act is not None else block


def _batches(calibration_data) -> Iterable[torch.Tensor]:
    if isinstance(calibration_data, torch.Tensor):
        return [calibration_data]
    return (b[0] if isinstance(b, (tuple, list)) else b for b in calibration_data)


def quantize_static(model: nn.Module, calibration_data, *, backend: str = "x86", inplace: bool = False
                    ) -> nn.Module:
    """Static post-training int8 quantization, the classic eager-mode flow of torch.ao.quantization:
    observers inserted (prepare), calibration over data, convert to quantized kernels.

    DEPRECATED IN PYTORCH: torch.ao.quantization warns that it "is deprecated and will be removed in
    2.10" (the warning torch 2.13 still prints) and points eager-mode users to torchao's `quantize_`
    (`torchfast.compress.quantize`) and graph-mode users to torchao's pt2e flow. It is here because the
    tutorials teach it and its models export to ONNX with the TorchScript exporter.

    Every nn.Linear / Conv1d/2d/3d (torchfast.nn.Linear included) becomes QuantStub -> layer ->
    DeQuantStub, so each quantized layer has its own input scale and the modules between stay float
    (torchfast activations keep their fused kernels; torchfast.nn.Linear's activation becomes the
    matching torchfast module after the quantized matmul). Weights are per-channel int8, activations
    uint8 with the backend's default qconfig.

    Args:
        model: any nn.Module; quantized in eval mode.
        calibration_data: a Tensor (one batch of inputs) or an iterable of batches (Tensors, or tuples
            whose first element is the input, e.g. a DataLoader of (x, y)).
        backend: "x86", "fbgemm" or "qnnpack"; sets torch.backends.quantized.engine, which the
            quantized model needs at run time too.
        inplace: convert `model` itself; by default a deep copy, leaving `model` unchanged.

    Returns the quantized model. It runs on CPU and exports with
    torchfast.export.onnx(..., exporter="torchscript") (the dynamo exporter cannot trace quantized
    modules). Raises ValueError for a bad argument, no layer to quantize or no calibration batch.
    """
    original = check_module("quantize_static", model)
    check_choice("quantize_static", "backend", backend, STATIC_BACKENDS)
    if backend not in torch.backends.quantized.supported_engines:
        raise fail("quantize_static", "backend", f"is {backend!r}, which this torch build lacks (it has "
                   f"{torch.backends.quantized.supported_engines})", RuntimeError)
    if not any(isinstance(m, _STATIC_LAYERS) for m in original.modules()):
        raise fail("quantize_static", "model", "has nothing to quantize: no nn.Linear or nn.Conv1d/2d/3d layer")
    if not isinstance(calibration_data, (torch.Tensor, Iterable)):
        raise fail("quantize_static", "calibration_data", "must be a Tensor or an iterable of batches, got "
                   f"{type(calibration_data).__name__}", TypeError)
    with warnings.catch_warnings():
        # The default qconfigs themselves trigger torch's "reduce_range will be deprecated" notice.
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")
        # convert's own calls to torch.quantize_per_channel warn that quantized dtypes are deprecated:
        # the same deprecation as the flow's, stated in this docstring.
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        import torch.ao.quantization as tq

        model = working_copy(original, inplace).eval()
        qconfig = tq.get_default_qconfig(backend)
        if isinstance(model, _STATIC_LAYERS):  # a bare layer has no parent to hold its wrapper
            model = nn.Sequential(model)
        parents = [(p, name, child) for p in model.modules() for name, child in p.named_children()
                   if isinstance(child, _STATIC_LAYERS)]
        for parent, name, child in parents:
            wrapped = _wrap(child, tq)
            (wrapped[0] if isinstance(wrapped[0], nn.Sequential) else wrapped).qconfig = qconfig
            setattr(parent, name, wrapped)
        torch.backends.quantized.engine = backend
        tq.prepare(model, inplace=True)
        seen = 0
        with torch.no_grad():
            for x in _batches(calibration_data):
                model(x)
                seen += 1
        if not seen:
            raise fail("quantize_static", "calibration_data", "holds no batch; the observers need at least one")
        tq.convert(model, inplace=True)
    return model
