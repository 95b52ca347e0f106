// Vectorized activation functions and their derivatives, shared by the bias_act and glu CPU kernels.
// Included only by `*_kernel.cpp` files (compiled once per ISA); V is Vectorized<float> (float32 and,
// widened, bfloat16/float16) or Vectorized<double>.
//
// Special values follow torch's float64 results, which are the mathematically right ones:
//   gelu(+inf) = +inf, gelu(-inf) = NaN (-inf * 0), gelu'(+-inf) = NaN, gelu'(-1e30) = 0.
// torch's own float32 CPU kernels differ in two places, both artifacts of their formulas: F.gelu gives
// NaN at +inf (float32 only), and gelu_tanh's gradient is NaN for |x| > ~1e13 where x^3 overflows.
#pragma once

#include <torchfast/act_codes.h>
#include <torchfast/elementwise.h>

#include <type_traits>

namespace torchfast::cpu {
inline namespace CPU_CAPABILITY {

// relu(x) = x > 0 ? x : 0, NaN kept. Its gradient follows torch's threshold_backward: the gradient
// passes where !(x <= 0), so a NaN input passes its gradient through, as in torch.
struct Relu {
  template <typename V>
  static V fwd(const V& x) {
    return V::blendv(x, V(0), x <= V(0));
  }
  template <typename V>
  static V bwd(const V& g, const V& x) {
    return V::blendv(g, V(0), x <= V(0));
  }
};

struct Identity {
  template <typename V>
  static V fwd(const V& x) {
    return x;
  }
  template <typename V>
  static V bwd(const V& g, const V&) {
    return g;
  }
};

// swish(x) = x * s, s = sigmoid(x);  swish'(x) = s * (1 + x * (1 - s)).  T is the storage type, which
// picks exp_neg's accuracy (elementwise.h).
// The exponential e = exp(-x) is split out (pre, then the *_from functions), so that the AVX2 block
// loops can run it in a pass of its own (with_split_blocks, rowmap.h); every ISA computes the same
// expressions through them.
template <typename T>
struct Swish {
  template <typename V>
  static V pre(const V& x) {
    return exp_neg<T>(x);
  }
  template <typename V>
  static V fwd_from(const V& x, const V& e) {
    return x / (V(1) + e);
  }
  template <typename V>
  static void fwd_deriv_from(const V& x, const V& e, V& y, V& d) {
    const V one(1);
    V s = one / (one + e);
    y = x * s;
    d = s * (one + x * (one - s));
  }
  template <typename V>
  static V fwd(const V& x) {
    return fwd_from(x, pre(x));
  }
  // y = act(x) and d = act'(x) together, sharing the exponential.
  template <typename V>
  static void fwd_deriv(const V& x, V& y, V& d) {
    fwd_deriv_from(x, pre(x), y, d);
  }
  template <typename V>
  static V bwd(const V& g, const V& x) {
    V y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// gelu(x) = x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2;  gelu'(x) = Phi(x) + x * phi(x),
// phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
// Phi comes from erfc, not from 1 + erf(x / sqrt 2): for negative x that sum cancels, and ATen's fast
// float erf (Abramowitz-Stegun 7.1.26, 1.5e-7 absolute) leaves a relative error of 25% at x = -5 (in
// torch's own F.gelu too). In float we write, with z = |x| / sqrt 2 and t = 1 / (1 + z/2),
//     erfc(z) = t * exp(-z^2) * R(t),    R(t) = erfcx(z) / t, smooth on t in (0, 1],
// as in Numerical Recipes' erfcc (Press et al., sec. 6.2, which puts log R in the exponent instead).
// R is a polynomial fitted for relative error (scripts/fit_gelu_erfc.py): degree 9, 3.2e-7 with float
// Horner, for float32 outputs; degree 6, 1.3e-5, for bf16/fp16 outputs, whose own rounding is 3.9e-3 /
// 4.9e-4. exp(-z^2) is ATen's exp_u20 (20 ULP) and serves both Phi and phi, so the forward and the
// backward cost one exponential and one division each (for bf16 outputs on AVX-512, a 14-bit
// reciprocal instead of the division: see recip_approx). What remains is the float rounding of z^2
// inside the exponential: a relative error of about z^2 * 1.2e-7, 1e-6 at x = -4 and 1.4e-5 at x = -12
// where gelu(x) is -2e-32. So the tails stay accurate (gelu'(-10) = -7.7e-22 in float32, where torch's
// float32 kernel returns 0). float64 keeps Sleef's 1.5-ULP erfc (std::erfc in the DEFAULT build).
template <bool kReducedOutput, bool kBf16Output = false>
struct GeluErf {
  static constexpr double kInvSqrt2Pi = 0.3989422804014327;  // 1 / sqrt(2 pi)

  // Phi(x) and exp(-x^2 / 2), float only.
  template <typename V>
  static V cdf(const V& x, V& e) {
    V z = x.abs() * V(M_SQRT1_2);
    // t in (0, 1]. For bf16 outputs a 14-bit reciprocal is plenty (recip_approx): it adds at most
    // 6e-5 relative to erfc, against bf16's 3.9e-3 rounding, and made bf16 gelu fwd+bwd about 1.2x
    // faster. Not for fp16: near the zero of gelu' (x = -0.75) the derivative c + x * phi cancels,
    // and its error there grew from 2 to 9 fp16 epsilons (relative to that small value).
    V t = kBf16Output ? recip_approx(V(1) + V(0.5) * z) : V(1) / (V(1) + V(0.5) * z);
    V r;
    if constexpr (kReducedOutput) {
      r = V(0.0568109653);
      for (double c : {-0.254106823, 0.258356148, 0.120144216, 0.255022282, 0.281661987, 0.282098408}) {
        r = at::vec::fmadd(r, t, V(c));
      }
    } else {
      r = V(-0.025522865);
      for (double c : {0.0644614299, 0.0307534424, -0.198549117, 0.0794693494, 0.0582615236, 0.180414909,
                       0.246512203, 0.282104219, 0.282094747}) {
        r = at::vec::fmadd(r, t, V(c));
      }
    }
    // exp(-z^2) <= 1 never overflows; fexp_u20 (elementwise.h) is enough below bf16/fp16 rounding
    e = kReducedOutput ? (z * z).neg().fexp_u20() : (z * z).neg().exp_u20();
    V half_erfc = V(0.5) * t * e * r;  // Phi(-|x|)
    return V::blendv(V(1) - half_erfc, half_erfc, x <= V(0));
  }
  template <typename V>
  static V fwd(const V& x) {
    if constexpr (std::is_same_v<V, Vectorized<double>>) {
      return x * (V(0.5) * (x * V(-M_SQRT1_2)).erfc());
    } else {
      V e;
      return x * cdf(x, e);
    }
  }
  template <typename V>
  static void fwd_deriv(const V& x, V& y, V& d) {
    if constexpr (std::is_same_v<V, Vectorized<double>>) {
      V c = V(0.5) * (x * V(-M_SQRT1_2)).erfc();
      y = x * c;
      d = c + x * (V(kInvSqrt2Pi) * (x * x * V(-0.5)).exp());
    } else {
      V e;
      V c = cdf(x, e);
      y = x * c;
      d = c + x * (V(kInvSqrt2Pi) * e);
    }
  }
  template <typename V>
  static V bwd(const V& g, const V& x) {
    V y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// gelu_tanh(x) = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3)   (Hendrycks & Gimpel).
// 1 + tanh(u) = 2 sigmoid(2u), so y = x * s with s = sigmoid(2u): one exponential instead of a tanh,
// and no cancellation in 1 + tanh(u) for negative u.
//   gelu_tanh'(x) = s + x * 2 s (1 - s) * u',   u' = sqrt(2/pi) * (1 + 3 * 0.044715 x^2).
// The polynomial u' is evaluated at x clamped to +-1e4 (where s is already exactly 0 or 1), so
// x^2 cannot overflow into 0 * inf = NaN for large finite x; x itself is not clamped, so +-inf and
// NaN still give NaN as in torch.
template <typename T>
struct GeluTanh {
  static constexpr double kBeta = 0.7978845608028654;  // sqrt(2 / pi)
  static constexpr double kKappa = 0.044715;
  template <typename V>
  static V sig2u(const V& x) {
    V u = V(kBeta) * x * (V(1) + V(kKappa) * x * x);
    return V(1) / (V(1) + exp_neg<T>(u + u));
  }
  template <typename V>
  static V fwd(const V& x) {
    return x * sig2u(x);
  }
  template <typename V>
  static void fwd_deriv(const V& x, V& y, V& d) {
    const V one(1);
    V s = sig2u(x);
    V xc = at::vec::clamp(x, V(-1e4), V(1e4));
    V du = V(kBeta) * (one + V(3 * kKappa) * xc * xc);
    y = x * s;
    d = s + (x * s * (one - s)) * (V(2) * du);
  }
  template <typename V>
  static V bwd(const V& g, const V& x) {
    V y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// Whether A splits its exponential out (pre / *_from) and T's kernels run it in a pass of its own.
template <typename A>
struct has_split_exp : std::false_type {};
template <typename T>
struct has_split_exp<Swish<T>> : std::true_type {};
template <typename T, typename A>
inline constexpr bool kSplitExp = uses_float_blocks_v<T> && has_split_exp<A>::value;

template <typename T>
using Gelu = GeluErf<at::vec::is_reduced_floating_point_v<T>, std::is_same_v<T, c10::BFloat16>>;

// Calls fn(Act{}) with the functor of activation `code` (see act_codes.h) for data of type T.
template <typename T, typename Fn>
void dispatch_act(int code, const Fn& fn) {
  switch (static_cast<ActCode>(code)) {
    case ActCode::Identity:
      return fn(Identity{});
    case ActCode::Relu:
      return fn(Relu{});
    case ActCode::Gelu:
      return fn(Gelu<T>{});
    case ActCode::GeluTanh:
      return fn(GeluTanh<T>{});
    case ActCode::Swish:
      return fn(Swish<T>{});
  }
  TORCH_CHECK(false, "torchfast: internal error: unknown activation code ", code);
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
