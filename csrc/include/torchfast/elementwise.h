// Building blocks for the vectorized elementwise CPU kernels. Included only by `*_kernel.cpp` files,
// which are compiled once per ISA: everything here sits in an ISA-specific namespace (through
// at::vec's inline CPU_CAPABILITY namespace and our own), so the AVX-512 copy of a helper can never be
// picked by the linker for the baseline copy.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <limits>
#include <tuple>
#include <type_traits>

namespace torchfast::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per task for at::parallel_for: big enough that a thread's work (about 32K elements,
// 128 KB of fp32 in and out) dwarfs the cost of waking it, small enough to split 2^16 elements.
constexpr int64_t kGrain = 32768;

// Rounds 2N floats (two vectors) to one vector of the reduced type T (bfloat16 or float16), to
// nearest even. Compiled for AVX512_BF16 (our extra ISA variant), bfloat16 takes one VCVTNE2PS2BF16
// instead of at::vec's integer emulation (about ten instructions per 16 lanes). The only difference
// in results: the instruction flushes float32 subnormals (|v| < 1.2e-38) to zero, as oneDNN's bf16
// kernels do; NaN stays NaN and infinities stay infinite. Scalar tails (the norm kernels' columns past
// the last full vector) round with static_cast and keep subnormals, so that flush depends on the column.
template <typename T>
inline Vectorized<T> round_to(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // The first operand fills the upper 16 lanes.
    return Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

// 1 / d with a relative error below 2^-14, for math whose result is stored as bfloat16 or float16
// (their rounding is 2^-9 / 2^-11): on AVX-512 one VRCP14PS instead of a division, which costs as
// much as ten multiply-adds. Exact division elsewhere. rcp14(+-inf) = +-0 and rcp14(NaN) = NaN, as
// 1/d; d must not be 0 (the callers' d is >= 1).
inline Vectorized<float> recip_approx(const Vectorized<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vectorized<float>(_mm512_rcp14_ps(d));
#else
  return Vectorized<float>(1) / d;
#endif
}

// Whether this ISA's kernels widen bf16/fp16 operands block by block into float buffers and run
// the float loop on them (with_float_blocks), instead of widening, computing and rounding each vector
// in one step. On AVX2 the one-step loop is bound by the out-of-order window, not by arithmetic: it has
// 16 vector registers and about 60 instructions per 16 bf16 elements whose dependency chain (load,
// widen, exp, divide, round, pack) is long, so too few iterations fit in flight; split into three
// short loops over a block in L1, swish ran 1.3x faster (0.51 -> 0.39 ns per element, one Zen 4 core
// running the AVX2 code; the float loop alone: 0.31). With AVX-512's 32 registers the one-step loop was
// as fast or faster (AVX512_BF16: 0.25 vs 0.26 ns staged), so those variants keep it.
#if defined(CPU_CAPABILITY_AVX2)
inline constexpr bool kFloatBlocks = true;
#else
inline constexpr bool kFloatBlocks = false;
#endif

template <typename T>
inline constexpr bool uses_float_blocks_v = kFloatBlocks && at::vec::is_reduced_floating_point_v<T>;

// Elements per block: with up to five operands, 5 x 2 KB of float stays in L1 (32 KB).
inline constexpr int64_t kFloatBlock = 512;

// dst[0:n] = float(src[0:n]), n <= kFloatBlock.
template <typename T>
inline void widen_block(const T* src, int64_t n, float* dst) {
  using R = Vectorized<T>;
  using F = Vectorized<float>;
  int64_t i = 0;
  for (; i + R::size() <= n; i += R::size()) {
    auto [a, b] = at::vec::convert_to_float<T>(R::loadu(src + i));
    a.store(dst + i);
    b.store(dst + i + F::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[0:n] = round_T(src[0:n]), to nearest even like the one-step loops' stores.
template <typename T>
inline void narrow_block(const float* src, int64_t n, T* dst) {
  using R = Vectorized<T>;
  using F = Vectorized<float>;
  int64_t i = 0;
  for (; i + R::size() <= n; i += R::size()) {
    round_to<T>(F::loadu(src + i), F::loadu(src + i + F::size())).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Runs body(offset, count, ins, outs) over the `len` elements of NI input and NO output operands of
// type T, where ins / outs are std::arrays of pointers to the first of `count` elements and `offset`
// is that element's index in [0, len) (for operands the body indexes itself, such as a float bias).
// Where uses_float_blocks_v<T>, the pointers are float: blocks of kFloatBlock elements widened from the
// inputs, and rounded into the outputs after the body ran; the body then is the float kernel, with
// the bf16/fp16 accuracy choices it was instantiated with. Elsewhere, or with kStage false (a kernel
// whose measurements favour the one-step loop), body runs once on the T pointers.
template <typename T, bool kStage = true, size_t NI, size_t NO, typename Body>
inline void with_float_blocks(int64_t len, const std::array<const T*, NI>& in, const std::array<T*, NO>& out,
                              const Body& body) {
  if constexpr (kStage && uses_float_blocks_v<T>) {
    alignas(64) float buf[NI + NO][kFloatBlock];
    std::array<const float*, NI> fin;
    std::array<float*, NO> fout;
    for (size_t k = 0; k < NI; ++k) fin[k] = buf[k];
    for (size_t k = 0; k < NO; ++k) fout[k] = buf[NI + k];
    for (int64_t b = 0; b < len; b += kFloatBlock) {
      const int64_t n = std::min(kFloatBlock, len - b);
      for (size_t k = 0; k < NI; ++k) widen_block(in[k] + b, n, buf[k]);
      body(b, n, fin, fout);
      for (size_t k = 0; k < NO; ++k) narrow_block(fout[k], n, out[k] + b);
    }
  } else {
    body(int64_t{0}, len, in, out);
  }
}

// out[i] = fn(in1[i], in2[i], ...) over n elements of T: fn takes and returns compute_vec_t<T>
// (float for the reduced types, which are widened on load and rounded once on store).
template <typename T, typename Fn, typename... In>
void map_n(const Fn& fn, T* out, int64_t n, const In*... in) {
  if constexpr (uses_float_blocks_v<T>) {
    with_float_blocks<T>(n, std::array<const T*, sizeof...(In)>{in...}, std::array<T*, 1>{out},
                         [&](int64_t, int64_t count, const auto& fin, const auto& fout) {
                           std::apply([&](const auto*... p) { map_n<float>(fn, fout[0], count, p...); }, fin);
                         });
  } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    using R = Vectorized<T>;
    auto step = [&](int64_t i, int64_t count) {
      auto load = [&](const T* p) {
        return at::vec::convert_to_float<T>(count == R::size() ? R::loadu(p + i) : R::loadu(p + i, count));
      };
      auto widened = std::make_tuple(load(in)...);
      auto lo = std::apply([&](const auto&... w) { return fn(std::get<0>(w)...); }, widened);
      auto hi = std::apply([&](const auto&... w) { return fn(std::get<1>(w)...); }, widened);
      R r = round_to<T>(lo, hi);
      count == R::size() ? r.store(out + i) : r.store(out + i, count);
    };
    int64_t i = 0;
    for (; i + R::size() <= n; i += R::size()) step(i, R::size());
    if (i < n) step(i, n - i);
  } else if constexpr (sizeof...(In) == 1) {
    at::vec::map<T>(fn, out, in..., n);
  } else {
    at::vec::map2<T>(fn, out, in..., n);
  }
}

// map_n split across threads.
template <typename T, typename Fn>
void parallel_map(const Fn& fn, T* out, const T* in, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    map_n<T>(fn, out + begin, end - begin, in + begin);
  });
}

template <typename T, typename Fn>
void parallel_map2(const Fn& fn, T* out, const T* in1, const T* in2, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    map_n<T>(fn, out + begin, end - begin, in1 + begin, in2 + begin);
  });
}

// Calls fn.template operator()<T>() with T the C++ type of `dtype` (one of the four float types).
template <typename Fn>
void dispatch_float(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return fn(float{});
    case c10::ScalarType::Double:
      return fn(double{});
    case c10::ScalarType::BFloat16:
      return fn(c10::BFloat16{});
    case c10::ScalarType::Half:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, "torchfast: internal error: unexpected dtype ", dtype);
  }
}

// The vector type the math runs in: float for the reduced types (fp32 math inside), T otherwise.
template <typename T>
using compute_vec_t = Vectorized<std::conditional_t<std::is_same_v<T, double>, double, float>>;

// exp(-x), computed in T's compute type with the accuracy T's storage needs.
//  - float: exp_u20 (a polynomial, no Sleef call: about twice as fast as Sleef's 1-ULP exp; 20 ULP is
//    within fp32 test tolerance). It saturates at FLT_MAX instead of overflowing, so where exp(-x)
//    should be +inf we put inf back: then swish(-inf) = -inf / inf = NaN, as torch's silu gives.
//  - bf16/fp16: fexp_u20 (a cubic in 2^frac, about 13% faster again): its error is far below one bf16
//    or fp16 rounding of the result, and it returns +inf on overflow and 0 on underflow by itself.
//  - double: Sleef's exp: float64 is the precision users pick on purpose, so keep it exact.
template <typename T>
inline compute_vec_t<T> exp_neg(const compute_vec_t<T>& x) {
  if constexpr (std::is_same_v<T, double>) {
    return x.neg().exp();
  } else if constexpr (std::is_same_v<T, float>) {
    const Vectorized<float> overflow(88.72283935546875f);  // ln(FLT_MAX)
    const Vectorized<float> inf(std::numeric_limits<float>::infinity());
    Vectorized<float> neg = x.neg();
    return Vectorized<float>::blendv(neg.exp_u20(), inf, neg > overflow);
  } else {
    return x.neg().fexp_u20();
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
