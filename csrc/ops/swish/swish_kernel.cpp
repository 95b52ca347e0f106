// swish / SiLU CPU kernels, compiled once per ISA (see csrc/include/torchfast/cpu_isa.h).
//
//   forward:  y  = x * sigmoid(x) = x / (1 + exp(-x))
//   backward: dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x)
//
// bf16/fp16 are widened to fp32 (per vector; on AVX2 per block of 512, see with_float_blocks, and in
// the backward with_split_blocks), computed, and rounded once on store.
#include <torchfast/activations.h>
#include <torchfast/rowmap.h>

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
    if constexpr (kSplitExp<T, Swish<T>>) {  // AVX2 bf16/fp16: the exponential in a pass of its own
      using L = MapLanes<T>;
      const T* gp = static_cast<const T*>(grad_out);
      const T* xp = static_cast<const T*>(x);
      T* dp = static_cast<T*>(grad_in);
      at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
        with_split_blocks<T, Swish<T>>(
            end - begin, [&](int64_t i, int64_t c, V (&v)[L::kN]) { L::load(xp + begin + i, c, v); },
            [&](int64_t b, int64_t count, const float* xf, const float* ef) {
          for_steps<L>(count, [&](int64_t i, int64_t c) {
            V v[L::kN], e[L::kN], g[L::kN];
            L::load_c(xf + i, c, v);
            L::load_c(ef + i, c, e);
            L::load(gp + begin + b + i, c, g);
            const V one(1);
            for (int k = 0; k < L::kN; ++k) {  // the expression of the general path below
              V s = one / (one + e[k]);
              g[k] = g[k] * s * (one + v[k] * (one - s));
            }
            L::store(dp + begin + b + i, c, g);
          });
        });
      });
      return;
    }
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
