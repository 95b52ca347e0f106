"""The activations of bias_act and the gated units, in plain PyTorch: values, first and second
derivatives. They are the references the kernels are tested against, the kernels of the build without
_C, and the math of the double-backward formulas (which run rarely, so plain torch ops are enough),
used by the op modules (torchfast/ops/) and the Triton operators (torchfast/triton/) alike.

    identity  x                                  1                            0
    relu      x > 0 ? x : 0                      !(x <= 0)                    0
    gelu      x Phi(x)                           Phi + x phi                  phi (2 - x^2)
    gelu_tanh x s,  s = sigmoid(2u)              s + x s'                     2 s' + x s''
              u = sqrt(2/pi) (x + 0.044715 x^3), s' = 2 s (1 - s) u', s'' = 2 u' (1 - 2 s) s' + 2 s (1 - s) u''
    swish     x s,  s = sigmoid(x)               s (1 + x (1 - s))            s (1 - s) (2 + x (1 - 2 s))

with Phi, phi the standard normal CDF and density. relu's derivative follows torch's threshold_backward
(the gradient passes where !(x <= 0), so also at NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTS = ("identity", "relu", "gelu", "gelu_tanh", "swish")
GATED = {"swish": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu"}
BETA = math.sqrt(2.0 / math.pi)  # gelu_tanh's u = BETA (x + KAPPA x^3); the ONNX translations use them too
KAPPA = 0.044715


def check_act(act, op: str, arg: str = "act") -> str:
    if not isinstance(act, str) or act not in ACTS:
        raise ValueError(
            f"torchfast.{op}: unknown activation {act!r} for argument '{arg}'; expected one of "
            f"{', '.join(ACTS)}"
        )
    return act


def gelu_act(approximate, op: str) -> str:
    """geglu's `approximate` ("none" | "tanh", as in F.gelu) as an activation name."""
    if approximate not in ("none", "tanh"):
        raise ValueError(
            f"torchfast.{op}: argument 'approximate' must be 'none' or 'tanh', got {approximate!r}"
        )
    return "gelu" if approximate == "none" else "gelu_tanh"


def act_fn(act: str, x: torch.Tensor) -> torch.Tensor:
    if act == "identity":
        return x
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        # erfc, not F.gelu's 1 + erf: exact in the negative tail (F.gelu(-20) is 0 even in float64)
        return 0.5 * x * torch.special.erfc(-x / math.sqrt(2))
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "swish":
        return x * torch.sigmoid(x)
    raise ValueError(act)


def _gelu_tanh_parts(x):
    u = BETA * (x + KAPPA * x**3)
    du = BETA * (1 + 3 * KAPPA * x * x)
    s = torch.sigmoid(2 * u)
    ds = 2 * s * (1 - s) * du
    return s, ds, du


def act_grad(act: str, x: torch.Tensor) -> torch.Tensor:
    """d act / dx at x."""
    if act == "identity":
        return torch.ones_like(x)
    if act == "relu":
        return (~(x <= 0)).to(x.dtype)
    if act == "gelu":
        return 0.5 * torch.special.erfc(-x / math.sqrt(2)) + x * _pdf(x)
    if act == "gelu_tanh":
        s, ds, _ = _gelu_tanh_parts(x)
        return s + x * ds
    if act == "swish":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    raise ValueError(act)


def act_grad2(act: str, x: torch.Tensor) -> torch.Tensor:
    """d^2 act / dx^2 at x."""
    if act in ("identity", "relu"):
        return torch.zeros_like(x)
    if act == "gelu":
        return _pdf(x) * (2 - x * x)
    if act == "gelu_tanh":
        s, ds, du = _gelu_tanh_parts(x)
        d2s = 2 * du * (1 - 2 * s) * ds + 2 * s * (1 - s) * (6 * BETA * KAPPA * x)
        return 2 * ds + x * d2s
    if act == "swish":
        s = torch.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))
    raise ValueError(act)


def _pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """What the kernels compute in: float32 for bf16/fp16 (and float32), float64 for float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
