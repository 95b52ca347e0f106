// swish / SiLU CPU kernels, compiled once per ISA (see csrc/include/torchfast/cpu_isa.h).
//
//   forward:  y  = x * sigmoid(x) = x / (1 + exp(-x))
//   backward: dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x)
//
// bf16/fp16 are widened to fp32 (per vector; on AVX2 per block of 512, see with_float_blocks),
// computed, and rounded once on store.
#include <torchfast/elementwise.h>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {

void swish_fwd(c10::ScalarType dtype, const void* x, void* y, int64_t n) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using V = compute_vec_t<T>;
    parallel_map<T>(
        [](V v) { return v / (V(1) + exp_neg<T>(v)); }, static_cast<T*>(y),
        static_cast<const T*>(x), n);
  });
}

void swish_bwd(c10::ScalarType dtype, const void* grad_out, const void* x, void* grad_in,
               int64_t n) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using V = compute_vec_t<T>;
    parallel_map2<T>(
        [](V g, V v) {
          const V one(1);
          V s = one / (one + exp_neg<T>(v));
          return g * s * (one + v * (one - s));
        },
        static_cast<T*>(grad_in), static_cast<const T*>(grad_out), static_cast<const T*>(x), n);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
