"""y = x W^T + b with the CPU float32 matmuls through oneDNN where that is the faster GEMM.

torch sends a float32 `F.linear` on CPU to MKL's sgemm. MKL picks its code path by CPU vendor, and on
AMD CPUs oneDNN's GEMM kernels (which torch also ships, as `torch.ops.mkldnn._linear_pointwise`, the op
inductor's CPU backend uses) are faster: on the AMD EPYC (AVX-512) of our CI, 1.07-1.21x for the forward
GEMM of transformer-sized layers and 1.39x for a few-token one (measured by
benchmarks/bench_linear.py). `linear` routes the forward and input-gradient GEMMs there and leaves
everything else to torch: the weight-gradient GEMM (where oneDNN is not reliably faster here),
bfloat16/float16 (torch already uses oneDNN for them), GPUs, autocast, tracing and export (the
ordinary F.linear, so exported graphs are unchanged), functorch transforms, forward-mode AD, tensor
subclasses (quantized weights, DTensor) and small GEMMs (oneDNN's per-call cost is larger than MKL's).

The oneDNN GEMM is the operator `torchfast::_onednn_linear` (internal: fake kernel and autograd, so
torch.compile keeps it in the graph as an opaque call, where inductor would otherwise pick MKL again).

Which backend runs is `cpu_matmul_backend()`: the environment variable TORCHFAST_CPU_MATMUL =
"onednn", "blas" or "auto" (the default: oneDNN on AMD/Hygon x86 CPUs, where it was measured faster,
torch's BLAS elsewhere, e.g. on Intel, where MKL is not handicapped and oneDNN was not measured).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_ENV = "TORCHFAST_CPU_MATMUL"
_BACKENDS = ("auto", "onednn", "blas")
# Below about 2^24 multiply-adds the oneDNN call's fixed cost (primitive lookup, ~15 us) outweighs its
# faster kernel (measured: 128x256x256 is 0.9x, 256x512x512 1.18x).
_MIN_MACS = 1 << 24


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    )


@functools.lru_cache(maxsize=None)
def _resolve(setting: str) -> str:
    if setting not in _BACKENDS:
        raise ValueError(
            f"torchfast linear: environment variable {_ENV} must be one of {_BACKENDS}, got {setting!r}"
        )
    if setting == "blas" or not _onednn_available():
        return "blas"
    if setting == "onednn":
        return "onednn"
    return "onednn" if _cpu_vendor() in ("AuthenticAMD", "HygonGenuine") else "blas"


def cpu_matmul_backend() -> str:
    """"onednn" or "blas": which library runs `linear`'s float32 CPU GEMMs in this process, from
    TORCHFAST_CPU_MATMUL (read on every eager call, so tests and users can switch it; torch.compile
    graphs use its value when torchfast was imported) and this CPU."""
    return _resolve(os.environ.get(_ENV, "auto").strip().lower() or "auto")


def _backend_or_blas() -> str:
    try:
        return cpu_matmul_backend()
    except ValueError:  # a bad TORCHFAST_CPU_MATMUL: the eager calls raise and say why
        return "blas"


# What torch.compile graphs use: dynamo reads this global (and guards on it) instead of tracing
# os.environ and the lru_cache above, so a compiled graph takes the choice made when torchfast was
# imported. (torch.compiler.assume_constant_result would re-read it per trace, but importing it imports
# dynamo, a second of import time.)
_BACKEND_FOR_COMPILE = _backend_or_blas()


def _push_backend_to_kernels() -> None:
    """The C++ kernels that issue float32 GEMMs themselves (linear_cross_entropy's chunks) follow the same
    choice, taken once here: they also run inside compiled graphs, where the environment is not re-read."""
    from torchfast._ext import _C

    if _C is not None:
        _C._set_onednn_matmul(_BACKEND_FOR_COMPILE == "onednn")


_push_backend_to_kernels()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eligible(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """The fast path runs exactly where it is F.linear with another GEMM library, and nothing could
    notice the difference but the speed (see the module docstring for what is left to torch). Under
    torch.compile only what a traced graph fixes is looked at (dynamo handles functorch and forward
    AD around the graph itself)."""
    compiling = torch.compiler.is_compiling()
    if torch.jit.is_tracing() or (compiling and torch.compiler.is_exporting()):
        return False
    if type(x) not in _PLAIN or type(w) not in _PLAIN or (b is not None and type(b) not in _PLAIN):
        return False
    if x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    if b is not None and (b.dtype != torch.float32 or b.device.type != "cpu" or b.shape != (w.shape[0],)):
        return False
    if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != w.shape[1] or x.numel() == 0 or w.numel() == 0:
        return False
    if x.numel() * w.shape[0] < _MIN_MACS:  # (tokens x in) x out multiply-adds
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if compiling:
        return _BACKEND_FOR_COMPILE == "onednn"
    if torch.onnx.is_in_onnx_export() or torch._C._are_functorch_transforms_active():  # vmap / grad
        return False
    if torch.autograd.forward_ad._current_level >= 0:  # inside dual_level: F.linear's jvp is needed
        return False
    return cpu_matmul_backend() == "onednn"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias through oneDNN, no autograd (x of any rank >= 2; weight may be a transposed
    view, read in place). The body of torchfast::_onednn_linear."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    # _unsafe_view, not view: the op's output must be a tensor of its own, or nn.Linear would return a
    # view of this internal 2-D result (FSDP2 warns about such module outputs: an in-place op on them
    # would skip its pre-backward all-gather). Backward does not save y, so nothing shares its version.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


_OP = "torchfast::_onednn_linear"


@torch.library.custom_op(_OP, mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
def _onednn_linear_op(x, weight, bias):
    """F.linear through oneDNN on float32 CPU tensors (internal: `linear` checks when it applies)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            raise ValueError(
                f"torchfast._onednn_linear: argument '{name}' must be a float32 CPU tensor, "
                f"got {t.dtype} on {t.device}"
            )
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"torchfast._onednn_linear: arguments 'x' {tuple(x.shape)} and 'weight' {tuple(weight.shape)} "
            "must be (..., in) and (out, in)"
        )
    return onednn_linear(x, weight, bias)


@_onednn_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)  # what F.linear saves
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """The grad-input GEMM through oneDNN again (this op, so double backward works), the weight
    gradient through torch's mm (MKL: oneDNN is not faster for it here), the bias gradient a sum."""
    x, weight = ctx.saved_tensors
    g = grad_y.reshape(-1, grad_y.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.torchfast._onednn_linear(grad_y, weight.t(), None)
    if ctx.needs_input_grad[1]:
        grad_w = g.t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g.sum(0)
    return grad_x, grad_w, grad_b


_onednn_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = input @ weight^T + bias, exactly `torch.nn.functional.linear`'s contract (shapes, dtypes,
    errors, gradients including double backward), with float32 CPU GEMMs through oneDNN where
    `cpu_matmul_backend()` says so and the call is eligible (see the module docstring); elsewhere it
    is F.linear. Results agree with F.linear to float32 rounding (the GEMMs sum in another order)."""
    if not eligible(input, weight, bias):
        return F.linear(input, weight, bias)
    return torch.ops.torchfast._onednn_linear(input, weight, bias)


__all__ = ["cpu_matmul_backend", "linear"]
