"""Drop-in replacements for torch.nn.RMSNorm (and its fused residual-add form) backed by torchfast's
rms_norm / add_rms_norm ops."""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from torchfast.ops.rms_norm import add_rms_norm, rms_norm


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(d) for d in normalized_shape)
    if not shape:
        raise ValueError("torchfast.nn: normalized_shape must name at least one dimension")
    return shape


def flatten_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x with its trailing `normalized_shape` dims flattened into one row dimension (a view when x is
    contiguous); a clear error when they do not match."""
    shape = module.normalized_shape
    k = len(shape)
    if x.dim() < k or tuple(x.shape[-k:]) != shape:
        raise RuntimeError(
            f"torchfast.nn.{type(module).__name__}: expected input with trailing dimensions {list(shape)} "
            f"(normalized_shape), got shape {list(x.shape)}"
        )
    return x if k == 1 else x.flatten(-k)


def flat(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.reshape(-1)


def unflatten_rows(y: torch.Tensor, shape: torch.Size, *, saved: bool = False) -> torch.Tensor:
    """The op's output `y` (rows flattened by flatten_rows) in the input's `shape`, as a tensor of its
    own, never a view of `y`.

    Why not y.view(shape): a module output that is a view trips wrappers that hook module outputs.
    FSDP2 registers its pre-backward all-gather on each output's grad_fn and warns that an in-place op
    on a view (`out += r`) would replace that grad_fn and silently skip the all-gather. With a 1-D
    normalized_shape (the usual case) y already has the shape and is returned as it is. Otherwise
    `aten._unsafe_view` gives the shape without a copy and without view tracking (what aten's own
    matmul does with its folded output). Its version counter is not y's, so when the op saved y for
    backward (`saved=True`, add_rms_norm's h) an in-place write into the result would go unnoticed:
    there the result is a copy. jit.trace records a plain view: the TorchScript ONNX exporter has no
    translation for _unsafe_view, and traced graphs do not run under FSDP.
    """
    if y.shape == shape:
        return y
    if torch.jit.is_tracing():
        return y.view(shape)
    if saved:
        return y.reshape(shape).clone()
    return torch.ops.aten._unsafe_view(y, shape)


# TorchScript versions of the helpers above (the scripted branch of forward; the ops check shapes).

def _script_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x if k == 1 else x.flatten(-k)


def _script_flat(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if p is None else p.reshape(-1)


def _script_eps(eps: Optional[float], x: torch.Tensor) -> float:
    if eps is None:  # machine epsilon of the math type, as torch.nn.RMSNorm
        return 2.220446049250313e-16 if x.dtype == torch.float64 else 1.1920928955078125e-07
    return eps


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the trailing `normalized_shape` dimensions.

    Same constructor, parameter names, `extra_repr` and state_dict as torch.nn.RMSNorm (eps=None means
    the machine epsilon of the math type, as there). Several trailing dimensions are flattened into one
    row. bf16/fp16 inputs may keep an fp32 weight: statistics in fp32, output in the input's dtype.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot compile the Python dispatch of torchfast.rms_norm (registry, impl=), so
            # a scripted module calls the dispatcher op that dispatch runs by default; the scripting
            # compiler compiles only this branch, everything else takes the one below.
            y, _ = torch.ops.torchfast.rms_norm(_script_rows(x, len(self.normalized_shape)),
                                                _script_flat(self.weight), _script_eps(self.eps, x))
            return y.view(x.shape)
        return unflatten_rows(rms_norm(flatten_rows(self, x), flat(self.weight), eps=self.eps), x.shape)

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


class AddRMSNorm(RMSNorm):
    """Fused `h = x + residual; y = RMSNorm(h)` of pre-norm transformer blocks: forward(x, residual)
    returns (y, h) in one pass over memory. Same parameters and state_dict as torch.nn.RMSNorm, so an
    RMSNorm's weights load into it unchanged."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():  # see RMSNorm.forward
            k = len(self.normalized_shape)
            y, h, _ = torch.ops.torchfast.add_rms_norm(_script_rows(x, k), _script_rows(residual, k),
                                                       _script_flat(self.weight), _script_eps(self.eps, x))
            return y.view(x.shape), h.view(x.shape)
        y, h = add_rms_norm(flatten_rows(self, x), flatten_rows(self, residual), flat(self.weight), eps=self.eps)
        return unflatten_rows(y, x.shape), unflatten_rows(h, x.shape, saved=True)
