"""Drop-in replacement for torch.nn.LayerNorm backed by torchfast's layer_norm op."""

from __future__ import annotations

import torch
from torch import nn

from torchfast.nn.rms_norm import _as_shape, _script_flat, _script_rows, flat, flatten_rows, unflatten_rows
from torchfast.ops.layer_norm import layer_norm


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` dimensions.

    Same constructor, parameter names, `extra_repr` and state_dict as torch.nn.LayerNorm. Several
    trailing dimensions are flattened into one row. bf16/fp16 inputs may keep fp32 parameters:
    statistics in fp32, output in the input's dtype.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # see torchfast.nn.RMSNorm.forward
            y, _, _ = torch.ops.torchfast.layer_norm(_script_rows(x, len(self.normalized_shape)),
                                                     _script_flat(self.weight), _script_flat(self.bias), self.eps)
            return y.view(x.shape)
        y = layer_norm(flatten_rows(self, x), flat(self.weight), flat(self.bias), eps=self.eps)
        return unflatten_rows(y, x.shape)  # not a view: see unflatten_rows

    def extra_repr(self) -> str:
        return (
            "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, "
            "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None)
        )
