// Cross-entropy CPU row kernels, compiled once per ISA (see cpu_isa.h). Math: cross_entropy.h and
// torchfast/reference/cross_entropy.py. With s = softcap(x), p = softmax(s), eps = label smoothing:
//
//   forward:  lse = log sum exp(s),  loss = lse - (1 - eps) s_t - eps mean(s) + z lse^2   (0 if ignored)
//   backward: dx_j = g (p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t]) (1 - (s_j / c)^2)
//
// The forward reads each row once: it walks the row in blocks of kBlock elements that stay in L1,
// takes the block's max, rescales the running sum-of-exp when the max grows (one scalar exp per block,
// not per element), then adds the block's exps. The backward recomputes p from the saved lse, so the
// forward keeps no [rows, V] tensor. Math in fp32 (fp64 for double), bf16/fp16 widened on load.
#include <torchfast/rowwise.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cross_entropy.h"

namespace torchfast::cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements per block: 8 KB of fp32, so the block is read from memory once and re-read from L1.
constexpr int64_t kBlock = 2048;

// exp of a value <= 0 (s - max or s - lse): ATen's 20-ULP polynomial exp for fp32 math, the exp ATen's
// own softmax kernels use (Sleef's 1-ULP exp made the forward compute-bound: 0.63 ns per logit at
// V=128256, 4x a read of the row). Inputs are never NaN here (a NaN row is handled before: the
// polynomial would clamp NaN to a finite value); below ln(FLT_MIN) it gives 0. fp64 keeps Sleef's.
template <typename A>
inline Vectorized<A> exp_nonpos(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

template <typename A>
inline A softcap_scalar(A x, A cap) {
  return cap > A(0) ? cap * std::tanh(x / cap) : x;
}

// buf[0:n] = softcap(x[0:n]) in the math type A.
template <typename T, typename A>
inline void load_block(const T* x, int64_t n, A cap, A* buf) {
  using V = Vectorized<A>;
  int64_t j = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; j + V::size() <= n; j += V::size()) V::loadu(x + j).store(buf + j);
  } else {
    using R = Vectorized<T>;
    for (; j + R::size() <= n; j += R::size()) {
      auto [a, b] = at::vec::convert_to_float<T>(R::loadu(x + j));
      a.store(buf + j);
      b.store(buf + j + V::size());
    }
  }
  for (; j < n; ++j) buf[j] = static_cast<A>(x[j]);
  if (cap > A(0)) {
    const V c(cap), inv(A(1) / cap);
    j = 0;
    for (; j + V::size() <= n; j += V::size()) (c * (V::loadu(buf + j) * inv).tanh()).store(buf + j);
    for (; j < n; ++j) buf[j] = softcap_scalar(buf[j], cap);
  }
}

// The block's values in the math type: the row itself when it is already fp32/fp64 and not softcapped
// (no copy), else `buf` filled by load_block.
template <typename T, typename A>
inline const A* block_values(const T* x, int64_t n, A cap, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (cap <= A(0)) return x;
  }
  load_block(x, n, cap, buf);
  return buf;
}

template <typename T>
void fwd_rows(const T* x, int64_t x_stride, const int64_t* target, int64_t begin, int64_t end, int64_t n,
              const CEOptions& o, acc_t<T>* loss, acc_t<T>* lse) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const A cap = static_cast<A>(o.softcap);
  const A inf = std::numeric_limits<A>::infinity();
  alignas(64) A buf[kBlock];
  for (int64_t i = begin; i < end; ++i) {
    const T* row = x + i * x_stride;
    A m = -inf, sum = 0, total = 0;
    bool nan = false;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t cnt = std::min(kBlock, n - b);
      const A* vals = block_values(row + b, cnt, cap, buf);
      const A bmax = at::vec::reduce_all<A>([](const V& u, const V& v) { return at::vec::maximum(u, v); }, vals, cnt);
      if (o.label_smoothing != 0) total += at::vec::reduce_all<A>([](const V& u, const V& v) { return u + v; }, vals, cnt);
      if (std::isnan(bmax)) {
        nan = true;
        continue;
      }
      if (bmax == -inf) continue;  // every exp is 0; keeps a leading all -inf block from giving NaN
      if (bmax > m) {
        sum *= std::exp(m - bmax);  // 0 when m was -inf
        m = bmax;
      }
      if (m == inf) continue;  // NaN below
      const V mv(m);
      sum += at::vec::map_reduce_all<A>([&](const V& v) { return exp_nonpos(v - mv); },
                                        [](const V& u, const V& v) { return u + v; }, vals, cnt);
    }
    // All -inf: log(0) = -inf, and the loss -inf - (-inf) = NaN; NaN or +inf anywhere: NaN. These are
    // F.cross_entropy's answers (its log_softmax subtracts an infinite max).
    const A l = (nan || m == inf) ? std::numeric_limits<A>::quiet_NaN() : m + std::log(sum);
    lse[i] = l;
    const int64_t t = target[i];
    if (t == o.ignore_index) {
      loss[i] = 0;
      continue;
    }
    const A st = softcap_scalar(static_cast<A>(row[t]), cap);
    A v = l - static_cast<A>(1.0 - o.label_smoothing) * st;
    if (o.label_smoothing != 0) v -= static_cast<A>(o.label_smoothing) * total / static_cast<A>(n);
    if (o.z_loss != 0) v += static_cast<A>(o.z_loss) * l * l;
    loss[i] = v;
  }
}

template <typename T>
void bwd_rows(const T* x, int64_t x_stride, const int64_t* target, const acc_t<T>* lse, const acc_t<T>* grad,
              int64_t grad_stride, int64_t begin, int64_t end, int64_t n, const CEOptions& o, T* dx,
              int64_t dx_stride) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const A cap = static_cast<A>(o.softcap);
  const A eps_v = static_cast<A>(o.label_smoothing / static_cast<double>(n));
  alignas(64) A buf[kBlock];
  for (int64_t i = begin; i < end; ++i) {
    const T* row = x + i * x_stride;
    T* out = dx + i * dx_stride;
    const int64_t t = target[i];
    const bool ignored = t == o.ignore_index;
    const A g = ignored ? A(0) : grad[i * grad_stride];
    const A l = lse[i];
    const A xt = ignored ? A(0) : static_cast<A>(row[t]);  // read before an in-place write overwrites it
    const A c1 = g * (A(1) + A(2) * static_cast<A>(o.z_loss) * l);  // multiplies p
    const A c0 = g * eps_v;                                            // subtracted from every class
    if (!std::isfinite(l)) {
      // A NaN or +inf logit gives lse = NaN, an all -inf row lse = -inf: every p is then NaN, as in
      // F.cross_entropy's backward (whatever g is). Written directly: exp_nonpos must not see NaN.
      std::fill(out, out + n, static_cast<T>(std::numeric_limits<A>::quiet_NaN()));
      continue;
    }
    const V c1v(c1), c0v(c0), lv(l), capv(cap), one(1);
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t cnt = std::min(kBlock, n - b);
      // In place (dx == x, linear_cross_entropy) each element is read before it is written.
      const A* vals = block_values(row + b, cnt, cap, buf);
      int64_t j = 0;
      auto grad_of = [&](const V& s) {
        V d = exp_nonpos(s - lv) * c1v - c0v;
        if (cap > A(0)) {
          const V r = s / capv;
          d = d * (one - r * r);
        }
        return d;
      };
      if constexpr (std::is_same_v<T, A>) {
        for (; j + V::size() <= cnt; j += V::size()) grad_of(V::loadu(vals + j)).store(out + b + j);
      } else {
        using R = Vectorized<T>;
        for (; j + R::size() <= cnt; j += R::size()) {
          round_to<T>(grad_of(V::loadu(vals + j)), grad_of(V::loadu(vals + j + V::size()))).store(out + b + j);
        }
      }
      for (; j < cnt; ++j) {
        const A s = vals[j];
        A d = std::exp(s - l) * c1 - c0;
        if (cap > A(0)) d *= A(1) - (s / cap) * (s / cap);
        out[b + j] = static_cast<T>(d);
      }
    }
    if (!ignored) {  // the target's class: the one-hot term, on the value computed from the saved x_t
      const A s = softcap_scalar(xt, cap);
      A d = std::exp(s - l) * c1 - c0 - g * static_cast<A>(1.0 - o.label_smoothing);
      if (cap > A(0)) d *= A(1) - (s / cap) * (s / cap);
      out[t] = static_cast<T>(d);
    }
  }
}


// ---- Column layout ----------------------------------------------------------------------------------
// linear_cross_entropy's bf16/fp16 chunks keep their logits as [V, tokens] (the GEMMs run faster that
// way; cross_entropy_cpu.cpp), so these kernels walk classes down the rows and keep one lane per token:
// element (class j, token i) at x[j * ld + i]. Same math and special values as the row kernels above.
// Tokens go in groups of kGroup lanes (one 64-byte line of bf16); classes in blocks of kColBlock rows,
// widened (and softcapped) into an L1 buffer once, then read by the max and the exp loops. A task walks
// its groups inside each block, so consecutive groups read consecutive bytes of each row.

constexpr int64_t kGroup = 32;
constexpr int64_t kColBlock = 64;

// dst[0:kGroup] = softcap(p[0:w]) in the math type, lanes past w set to 0 (computed, never stored).
template <typename T, typename A>
inline void load_lanes(const T* p, int64_t w, A cap, A* dst) {
  load_block(p, w, cap, dst);
  std::fill(dst + w, dst + kGroup, A(0));
}

// p[0:w] = src[0:w] rounded to T.
template <typename T, typename A>
inline void store_lanes(const A* src, int64_t w, T* p) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy(src, src + w, p);
  } else {
    narrow_block(src, w, p);
  }
}

template <typename T>
void fwd_cols(const T* x, int64_t ld, const int64_t* target, int64_t g_begin, int64_t g_end, int64_t cols, int64_t n,
              const CEOptions& o, acc_t<T>* loss, acc_t<T>* lse) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const A cap = static_cast<A>(o.softcap);
  const A inf = std::numeric_limits<A>::infinity();
  const bool smooth = o.label_smoothing != 0;
  const int64_t groups = g_end - g_begin;
  // Per token: running max, sum of exp(s - max), sum of s (label smoothing), NaN seen (all-ones bits).
  std::vector<A> state(4 * groups * kGroup);
  A* run_max = state.data();
  A* run_sum = run_max + groups * kGroup;
  A* run_tot = run_sum + groups * kGroup;
  A* run_nan = run_tot + groups * kGroup;
  std::fill(run_max, run_sum, -inf);
  std::fill(run_sum, run_max + 4 * groups * kGroup, A(0));
  alignas(64) A buf[kColBlock * kGroup];
  const V ninf(-inf), zero(0), one(1);
  for (int64_t b = 0; b < n; b += kColBlock) {
    const int64_t cnt = std::min(kColBlock, n - b);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t i0 = (g_begin + gi) * kGroup, w = std::min(kGroup, cols - i0);
      for (int64_t r = 0; r < cnt; ++r) load_lanes(x + (b + r) * ld + i0, w, cap, buf + r * kGroup);
      for (int64_t k = 0; k < kGroup; k += V::size()) {
        const int64_t s = gi * kGroup + k;
        V bmax = ninf, btot = zero;
        for (int64_t r = 0; r < cnt; ++r) {
          const V v = V::loadu(buf + r * kGroup + k);
          bmax = at::vec::maximum(bmax, v);  // propagates NaN
          if (smooth) btot = btot + v;
        }
        if (smooth) (V::loadu(run_tot + s) + btot).store(run_tot + s);
        const V isnan = bmax.isnan();
        (V::loadu(run_nan + s) | isnan).store(run_nan + s);
        bmax = V::blendv(bmax, ninf, isnan);  // a NaN lane's sum is never used: its lse is NaN
        const V m_old = V::loadu(run_max + s);
        const V m = at::vec::maximum(m_old, bmax);
        // Rescale the running sum when the max grows: exp(-inf) = 0 from a lane's first finite block;
        // a lane still all -inf keeps its sum of 0 (-inf - -inf would be NaN).
        V sum = V::loadu(run_sum + s) * V::blendv((m_old - m).exp(), one, m == ninf);
        // Subtract 0 where the max is infinite: an all -inf lane then adds exp(-inf) = 0, a +inf lane
        // gives NaN below whatever it adds.
        const V msub = V::blendv(m, zero, m.abs() == V(inf));
        V bsum = zero;
        for (int64_t r = 0; r < cnt; ++r) bsum = bsum + exp_nonpos(V::loadu(buf + r * kGroup + k) - msub);
        (sum + bsum).store(run_sum + s);
        m.store(run_max + s);
      }
    }
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t i0 = (g_begin + gi) * kGroup, w = std::min(kGroup, cols - i0);
    for (int64_t k = 0; k < w; ++k) {
      const int64_t s = gi * kGroup + k, i = i0 + k;
      const A m = run_max[s];
      const bool nan = run_nan[s] != A(0);  // all-ones bits (a NaN, != 0) or 0
      // As the row kernel: all -inf gives lse -inf, NaN or +inf anywhere gives NaN.
      const A l = (nan || m == inf) ? std::numeric_limits<A>::quiet_NaN() : m + std::log(run_sum[s]);
      lse[i] = l;
      const int64_t t = target[i];
      if (t == o.ignore_index) {
        loss[i] = 0;
        continue;
      }
      const A st = softcap_scalar(static_cast<A>(x[t * ld + i]), cap);
      A v = l - static_cast<A>(1.0 - o.label_smoothing) * st;
      if (smooth) v -= static_cast<A>(o.label_smoothing) * run_tot[s] / static_cast<A>(n);
      if (o.z_loss != 0) v += static_cast<A>(o.z_loss) * l * l;
      loss[i] = v;
    }
  }
}

template <typename T>
void bwd_cols(const T* x, int64_t ld, const int64_t* target, const acc_t<T>* lse, const acc_t<T>* grad,
              int64_t grad_stride, int64_t g_begin, int64_t g_end, int64_t cols, int64_t n, const CEOptions& o,
              T* dx) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const A cap = static_cast<A>(o.softcap);
  const A eps_v = static_cast<A>(o.label_smoothing / static_cast<double>(n));
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const int64_t groups = g_end - g_begin;
  // Per token: lse (0 where it is not finite), the factor of p, the constant subtracted, the NaN mask
  // (all-ones bits where lse is not finite: the whole column is then NaN, as in the row kernel), and
  // x at the target, read before an in-place write overwrites it.
  std::vector<A> state(5 * groups * kGroup, A(0));
  A* lv = state.data();
  A* c1 = lv + groups * kGroup;
  A* c0 = c1 + groups * kGroup;
  A* bad = c0 + groups * kGroup;
  A* xt = bad + groups * kGroup;
  A all_ones;
  std::memset(&all_ones, 0xff, sizeof(A));
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t i0 = (g_begin + gi) * kGroup, w = std::min(kGroup, cols - i0);
    for (int64_t k = 0; k < w; ++k) {
      const int64_t s = gi * kGroup + k, i = i0 + k;
      const int64_t t = target[i];
      const bool ignored = t == o.ignore_index;
      const A g = ignored ? A(0) : grad[i * grad_stride];
      const A l = lse[i];
      const bool finite = std::isfinite(l);
      lv[s] = finite ? l : A(0);
      c1[s] = g * (A(1) + A(2) * static_cast<A>(o.z_loss) * l);
      c0[s] = g * eps_v;
      if (!finite) bad[s] = all_ones;
      xt[s] = ignored ? A(0) : static_cast<A>(x[t * ld + i]);
    }
  }
  alignas(64) A buf[kGroup];
  const V capv(cap), one(1), nanv(nan);
  for (int64_t b = 0; b < n; b += kColBlock) {
    const int64_t cnt = std::min(kColBlock, n - b);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t i0 = (g_begin + gi) * kGroup, w = std::min(kGroup, cols - i0);
      for (int64_t r = 0; r < cnt; ++r) {
        const int64_t off = (b + r) * ld + i0;
        load_lanes(x + off, w, cap, buf);  // in place (dx == x): read before written
        for (int64_t k = 0; k < kGroup; k += V::size()) {
          const int64_t s = gi * kGroup + k;
          const V sv = V::loadu(buf + k);
          V d = exp_nonpos(sv - V::loadu(lv + s)) * V::loadu(c1 + s) - V::loadu(c0 + s);
          if (cap > A(0)) {
            const V q = sv / capv;
            d = d * (one - q * q);
          }
          V::blendv(d, nanv, V::loadu(bad + s)).store(buf + k);
        }
        store_lanes(buf, w, dx + off);
      }
    }
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t i0 = (g_begin + gi) * kGroup, w = std::min(kGroup, cols - i0);
    for (int64_t k = 0; k < w; ++k) {
      const int64_t s = gi * kGroup + k, i = i0 + k;
      const int64_t t = target[i];
      if (t == o.ignore_index || bad[s] != A(0)) continue;  // bad: all-ones bits (a NaN, != 0) or 0
      // The target's class: the one-hot term, on the value computed from the saved x_t.
      const A g = grad[i * grad_stride];
      const A l = lse[i];
      const A sx = softcap_scalar(xt[s], cap);
      A d = std::exp(sx - l) * c1[s] - c0[s] - g * static_cast<A>(1.0 - o.label_smoothing);
      if (cap > A(0)) d *= A(1) - (sx / cap) * (sx / cap);
      dx[t * ld + i] = static_cast<T>(d);
    }
  }
}

}  // namespace

void ce_fwd(c10::ScalarType dtype, const void* x, int64_t x_stride, const int64_t* target, int64_t rows, int64_t n,
            const CEOptions& o, void* loss, void* lse) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      fwd_rows(static_cast<const T*>(x), x_stride, target, begin, end, n, o, static_cast<A*>(loss),
               static_cast<A*>(lse));
    });
  });
}

void ce_bwd(c10::ScalarType dtype, const void* x, int64_t x_stride, const int64_t* target, const void* lse,
            const void* grad, int64_t grad_stride, int64_t rows, int64_t n, const CEOptions& o, void* dx,
            int64_t dx_stride) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      bwd_rows(static_cast<const T*>(x), x_stride, target, static_cast<const A*>(lse), static_cast<const A*>(grad),
               grad_stride, begin, end, n, o, static_cast<T*>(dx), dx_stride);
    });
  });
}

void ce_fwd_cols(c10::ScalarType dtype, const void* x, int64_t ld, const int64_t* target, int64_t cols, int64_t n,
                 const CEOptions& o, void* loss, void* lse) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t groups = (cols + kGroup - 1) / kGroup;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      fwd_cols(static_cast<const T*>(x), ld, target, begin, end, cols, n, o, static_cast<A*>(loss),
               static_cast<A*>(lse));
    });
  });
}

void ce_bwd_cols(c10::ScalarType dtype, const void* x, int64_t ld, const int64_t* target, const void* lse,
                 const void* grad, int64_t grad_stride, int64_t cols, int64_t n, const CEOptions& o, void* dx) {
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t groups = (cols + kGroup - 1) / kGroup;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      bwd_cols(static_cast<const T*>(x), ld, target, static_cast<const A*>(lse), static_cast<const A*>(grad),
               grad_stride, begin, end, cols, n, o, static_cast<T*>(dx));
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
