"""Activations and derivatives as Triton device functions, shared by the bias_act and glu kernels: the
math and special values of the C++ kernels (csrc/include/torchfast/activations.h).

ACT codes (csrc/include/torchfast/act_codes.h): 0 identity, 1 relu, 2 gelu, 3 gelu_tanh, 4 swish.
Inputs are already in the compute type: fp32 for fp32/bf16/fp16, fp64 for fp64 (F64 constexpr).

- gelu, fp32: Phi from erfc(z) = t * exp(-z^2) * R(t), t = 1 / (1 + z/2), z = |x| / sqrt 2, with the
  degree-9 polynomial R of the CPU kernels (scripts/fit_gelu_erfc.py, 3.2e-7 relative): accurate in
  the lower tail, where 1 + erf cancels. fp64: 1 + erf(x / sqrt 2) with libdevice's erf, accurate to
  about 1e-16 absolute (Triton has no erfc), within the float64 tolerance.
- sigmoid from e = exp(-|x|), which never overflows (torchfast/triton/swish.py explains).
- relu's gradient passes where !(x <= 0), as torch's threshold_backward.
"""

import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "swish": 4}


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def gelu_cdf_pdf(x, F64: tl.constexpr):
    """Phi(x) and phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    if F64:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    else:
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * z)
        r = -0.025522865 * t + 0.0644614299
        r = r * t + 0.0307534424
        r = r * t - 0.198549117
        r = r * t + 0.0794693494
        r = r * t + 0.0582615236
        r = r * t + 0.180414909
        r = r * t + 0.246512203
        r = r * t + 0.282104219
        r = r * t + 0.282094747
        e = tl.exp(-z * z)
        half_erfc = 0.5 * t * e * r  # Phi(-|x|)
        cdf = tl.where(x <= 0, half_erfc, 1.0 - half_erfc)
        pdf = e * 0.3989422804014327
    return cdf, pdf


@triton.jit
def gelu_tanh_parts(x):
    """s = sigmoid(2u) and du/dx at x clamped to +-1e4 (see activations.h, GeluTanh)."""
    u = 0.7978845608028654 * x * (1.0 + 0.044715 * x * x)
    s = sigmoid(2.0 * u)
    xc = tl.minimum(tl.maximum(x, -1e4), 1e4)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xc * xc)
    return s, du


@triton.jit
def act_fwd(x, ACT: tl.constexpr, F64: tl.constexpr):
    if ACT == 0:
        y = x
    elif ACT == 1:
        y = tl.where(x <= 0, 0.0, x)
    elif ACT == 2:
        cdf, _pdf = gelu_cdf_pdf(x, F64)
        y = x * cdf
    elif ACT == 3:
        s, _du = gelu_tanh_parts(x)
        y = x * s
    else:
        y = x * sigmoid(x)
    return y


@triton.jit
def act_fwd_deriv(x, ACT: tl.constexpr, F64: tl.constexpr):
    """(act(x), act'(x)) for the gated activations (gelu, gelu_tanh, swish)."""
    if ACT == 2:
        cdf, pdf = gelu_cdf_pdf(x, F64)
        y = x * cdf
        d = cdf + x * pdf
    elif ACT == 3:
        s, du = gelu_tanh_parts(x)
        y = x * s
        d = s + (x * s * (1.0 - s)) * (2.0 * du)
    else:
        s = sigmoid(x)
        y = x * s
        d = s * (1.0 + x * (1.0 - s))
    return y, d


@triton.jit
def act_bwd(g, x, ACT: tl.constexpr, F64: tl.constexpr):
    """g * act'(x); relu and identity pass g through (or 0) without multiplying."""
    if ACT == 0:
        dx = g
    elif ACT == 1:
        dx = tl.where(x <= 0, 0.0, g)
    else:
        _y, d = act_fwd_deriv(x, ACT, F64)
        dx = g * d
    return dx
