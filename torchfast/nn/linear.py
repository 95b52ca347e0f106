"""torch.nn.Linear with a fused bias + activation epilogue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchfast.ops._activations import check_act
from torchfast.ops.bias_act import bias_act
from torchfast.ops.linear import linear


def _own(y: torch.Tensor) -> torch.Tensor:
    """y as a tensor of its own when torch returned a view: F.linear on an input of 3 or more dimensions
    with a bias returns a view of its 2-D addmm result, which FSDP2 warns about in a wrapped module's
    output (an in-place op on it would skip the pre-backward all-gather). `_unsafe_view` gives the same
    storage without view tracking; nothing saved y for backward. jit.trace keeps the view: the
    TorchScript ONNX exporter cannot translate _unsafe_view."""
    if y._base is None or torch.jit.is_tracing():
        return y
    return torch.ops.aten._unsafe_view(y, y.shape)


class Linear(nn.Linear):
    """y = act(x W^T + b): the matmul through torch (BLAS / cuBLAS; on CPUs where oneDNN's float32 GEMM
    is the faster one, through oneDNN, see `torchfast.ops.linear`), then bias and activation in one
    fused pass (`torchfast.bias_act`) instead of the bias copy, the activation's extra tensor and, in
    backward, separate activation-gradient and bias-reduction passes.

    A subclass of `torch.nn.Linear` with the same constructor (plus the keyword `activation`), the same
    parameters `weight` and `bias` and the same state_dict, so a plain nn.Linear checkpoint loads into
    it. `activation` is None (plain nn.Linear), "relu", "gelu", "gelu_tanh", "swish" or "identity".
    Under autocast the matmul follows torch's rules (bf16 output) and the fp32 bias is cast to the
    output's dtype, as torch does for nn.Linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if activation is not None:
            check_act(activation, "nn.Linear", "activation")
        self.activation = activation

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None) -> Linear:
        """A torchfast Linear sharing `linear`'s parameters (no copy), e.g. to fuse an nn.Linear with the
        activation module that follows it."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            activation=activation,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            # TorchScript cannot compile torchfast's Python dispatch (see torchfast/nn/swish.py): a
            # scripted module calls the dispatcher op that the dispatch runs by default.
            if self.activation is None:
                return F.linear(input, self.weight, self.bias)
            return torch.ops.torchfast.bias_act(F.linear(input, self.weight), self.bias, act=self.activation)
        if self.activation is None:
            return _own(linear(input, self.weight, self.bias))
        return bias_act(linear(input, self.weight), self.bias, act=self.activation)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return base if self.activation is None else f"{base}, activation={self.activation!r}"
