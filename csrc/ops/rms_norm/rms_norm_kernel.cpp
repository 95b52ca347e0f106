// RMSNorm CPU kernels (rms_norm, add_rms_norm), compiled once per ISA (see cpu_isa.h).
//
//   forward:  r = 1 / sqrt(mean(x^2) + eps)      (one per row, kept for backward)
//             y = x * r * w
//   backward: with gw = g * w,
//             dx = r * gw - x * r^3 * sum(gw * x) / n
//             dw = sum over rows of g * x * r
//   add_rms_norm first forms h = x + residual, rounds it to the activation dtype (it is returned and
//   is what an unfused `h = x + residual; rms_norm(h)` would normalize), then normalizes h.
//
// Each row is read twice (statistics, then output); the second read hits the cache, so memory
// traffic is one read of x and one write of y. Statistics and math run in fp32 (fp64 for double);
// bf16/fp16 are widened per vector and rounded once on store. The weight is the activation dtype or,
// for bf16/fp16 activations, fp32 (AMP master weights), used as it is.
#include <torchfast/rowwise.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
acc_t<T> row_sumsq(const T* x, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  V s0(0), s1(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    L::load(x + j, a, b);
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  acc_t<T> s = hsum(s0 + s1);
  for (; j < n; ++j) {
    const acc_t<T> v = to_acc(x[j]);
    s += v * v;
  }
  return s;
}

// h = round_T(x + res), stored; returns the sum of squares of the rounded h.
template <typename T>
acc_t<T> row_add_sumsq(const T* x, const T* res, T* h, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  V s0(0), s1(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b, c, d;
    L::load(x + j, a, b);
    L::load(res + j, c, d);
    a = a + c;
    b = b + d;
    L::store(h + j, a, b);
    if constexpr (L::kReduced) L::load(h + j, a, b);  // the rounded values, as the caller sees them
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  acc_t<T> s = hsum(s0 + s1);
  for (; j < n; ++j) {
    h[j] = static_cast<T>(to_acc(x[j]) + to_acc(res[j]));
    const acc_t<T> v = to_acc(h[j]);
    s += v * v;
  }
  return s;
}

// y = x * r * w (w may be null).
template <typename T, typename W>
void row_scale(const T* x, const W* w, acc_t<T> r, T* y, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V rv(r);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    L::load(x + j, a, b);
    a = a * rv;
    b = b * rv;
    if (w != nullptr) {
      V wa, wb;
      load_weight<T>(w + j, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    L::store(y + j, a, b);
  }
  for (; j < n; ++j) {
    acc_t<T> v = to_acc(x[j]) * r;
    if (w != nullptr) v *= static_cast<acc_t<T>>(w[j]);
    y[j] = static_cast<T>(v);
  }
}

// sum(g * w * x) over one row (w may be null).
template <typename T, typename W>
acc_t<T> row_dot(const T* g, const T* x, const W* w, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  V d0(0), d1(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V ga, gb, xa, xb;
    L::load(g + j, ga, gb);
    L::load(x + j, xa, xb);
    if (w != nullptr) {
      V wa, wb;
      load_weight<T>(w + j, wa, wb);
      ga = ga * wa;
      gb = gb * wb;
    }
    d0 = at::vec::fmadd(ga, xa, d0);
    d1 = at::vec::fmadd(gb, xb, d1);
  }
  acc_t<T> dot = hsum(d0 + d1);
  for (; j < n; ++j) {
    const acc_t<T> gj = to_acc(g[j]);
    dot += (w != nullptr ? gj * static_cast<acc_t<T>>(w[j]) : gj) * to_acc(x[j]);
  }
  return dot;
}

// Rows processed together by the backward: their weight-gradient contributions are added to the
// partial sums in one sweep, so each partial (and weight) vector is loaded and stored once per kBlock
// rows instead of once per row. kBlock rows of g and x (4 x 2 x 32 KB for 8192 fp32) stay in L2
// between the two passes.
constexpr int64_t kBlock = 4;

// Backward of `count` <= kBlock consecutive rows. Pass 1 (per row): dot = sum(g * w * x).
// Pass 2 (all rows at once): dx = r * g * w - (r^3 * dot / n) * x (+ gsum); partial_dw += g * x * r.
template <typename T, typename W>
void rows_backward(const T* g, const T* x, const W* w, const acc_t<T>* rstd, const T* gsum, T* dx,
                   acc_t<T>* partial_dw, int64_t count, int64_t n) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  using V = typename L::V;
  A r[kBlock], coef[kBlock];
  for (int64_t b = 0; b < count; ++b) {
    r[b] = rstd[b];
    coef[b] = r[b] * r[b] * r[b] * row_dot(g + b * n, x + b * n, w, n) / static_cast<A>(n);
  }
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V wa(1), wb(1), pa(0), pb(0);
    if (w != nullptr) load_weight<T>(w + j, wa, wb);
    if (partial_dw != nullptr) LA::load(partial_dw + j, pa, pb);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t o = b * n + j;
      V ga, gb, xa, xb;
      L::load(g + o, ga, gb);
      L::load(x + o, xa, xb);
      const V rv(r[b]), cv(coef[b]);
      if (partial_dw != nullptr) {
        pa = at::vec::fmadd(ga * xa, rv, pa);
        pb = at::vec::fmadd(gb * xb, rv, pb);
      }
      V da = rv * (ga * wa) - cv * xa;
      V db = rv * (gb * wb) - cv * xb;
      if (gsum != nullptr) {
        V sa, sb;
        L::load(gsum + o, sa, sb);
        da = da + sa;
        db = db + sb;
      }
      L::store(dx + o, da, db);
    }
    if (partial_dw != nullptr) LA::store(partial_dw + j, pa, pb);
  }
  for (; j < n; ++j) {
    const A wj = w != nullptr ? static_cast<A>(w[j]) : A(1);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t o = b * n + j;
      const A gj = to_acc(g[o]), xj = to_acc(x[o]);
      if (partial_dw != nullptr) partial_dw[j] += gj * xj * r[b];
      A v = r[b] * gj * wj - coef[b] * xj;
      if (gsum != nullptr) v += to_acc(gsum[o]);
      dx[o] = static_cast<T>(v);
    }
  }
}

}  // namespace

// residual/h null: plain rms_norm. w null: no weight. rstd has acc_t<T> (float, or double).
void rms_norm_fwd(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const void* x, const void* residual,
                  const void* w, void* y, void* h, void* rstd, int64_t rows, int64_t n, double eps) {
  dispatch_float_weight(x_dtype, w_dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    const T* rp = static_cast<const T*>(residual);
    const W* wp = static_cast<const W*>(w);
    T* yp = static_cast<T*>(y);
    T* hp = static_cast<T*>(h);
    A* rs = static_cast<A*>(rstd);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* src = xp + i * n;
        A ss;
        if (rp != nullptr) {
          ss = row_add_sumsq(src, rp + i * n, hp + i * n, n);
          src = hp + i * n;
        } else {
          ss = row_sumsq(src, n);
        }
        // In double: one division per row, and eps added at full precision.
        const A r = static_cast<A>(1.0 / std::sqrt(static_cast<double>(ss) / static_cast<double>(n) + eps));
        rs[i] = r;
        row_scale(src, wp, r, yp + i * n, n);
      }
    });
  });
}

// gsum (the gradient of add_rms_norm's sum output) is added to dx when not null. dw null: no weight
// gradient. Partial weight gradients are summed per chunk of rows in acc_t, then across chunks.
void rms_norm_bwd(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const void* g, const void* x,
                  const void* w, const void* rstd, const void* gsum, void* dx, void* dw, int64_t rows,
                  int64_t n) {
  dispatch_float_weight(x_dtype, w_dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = acc_t<T>;
    const T* gp = static_cast<const T*>(g);
    const T* xp = static_cast<const T*>(x);
    const W* wp = static_cast<const W*>(w);
    const A* rs = static_cast<const A*>(rstd);
    const T* sp = static_cast<const T*>(gsum);
    T* dxp = static_cast<T*>(dx);
    const RowChunks chunks(rows, n);
    std::vector<A> partial(dw != nullptr ? chunks.count * n : 0, A(0));
    at::parallel_for(0, chunks.count, 1, [&](int64_t cbegin, int64_t cend) {
      for (int64_t c = cbegin; c < cend; ++c) {
        A* acc = dw != nullptr ? partial.data() + c * n : nullptr;
        for (int64_t i = chunks.begin(c); i < chunks.end(c); i += kBlock) {
          const int64_t count = std::min(kBlock, chunks.end(c) - i);
          rows_backward(gp + i * n, xp + i * n, wp, rs + i, sp != nullptr ? sp + i * n : nullptr, dxp + i * n,
                        acc, count, n);
        }
      }
    });
    if (dw != nullptr) sum_partials(partial, chunks.count, n, static_cast<W*>(dw));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
