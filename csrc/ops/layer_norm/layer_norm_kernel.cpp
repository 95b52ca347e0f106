// LayerNorm CPU kernels, compiled once per ISA (see cpu_isa.h).
//
//   forward:  m = mean(x),  r = 1 / sqrt(mean((x - m)^2) + eps)   (biased variance; m, r kept)
//             y = (x - m) * r * w + b
//   backward: with xc = x - m, gw = g * w,
//             dx = r * gw - r * sum(gw) / n - xc * r^3 * sum(gw * xc) / n
//             dw = sum over rows of g * xc * r,   db = sum over rows of g
//
// The variance is computed from x - m in a second pass over the row (which is in cache), not as
// mean(x^2) - m^2: that difference cancels catastrophically for rows with a large mean or one large
// outlier, which real activations have. Statistics and math in fp32 (fp64 for double); bf16/fp16 are
// widened per vector and rounded once on store; weight and bias may be fp32 for bf16/fp16 x.
#include <torchfast/rowwise.h>

#include <cmath>
#include <vector>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
acc_t<T> row_sum(const T* x, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  V s0(0), s1(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    L::load(x + j, a, b);
    s0 = s0 + a;
    s1 = s1 + b;
  }
  acc_t<T> s = hsum(s0 + s1);
  for (; j < n; ++j) s += to_acc(x[j]);
  return s;
}

template <typename T>
acc_t<T> row_centered_sumsq(const T* x, acc_t<T> mean, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V mv(mean);
  V s0(0), s1(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    L::load(x + j, a, b);
    a = a - mv;
    b = b - mv;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  acc_t<T> s = hsum(s0 + s1);
  for (; j < n; ++j) {
    const acc_t<T> v = to_acc(x[j]) - mean;
    s += v * v;
  }
  return s;
}

// y = (x - mean) * r * w + b (w, b may be null).
template <typename T, typename W>
void row_normalize(const T* x, const W* w, const W* bias, acc_t<T> mean, acc_t<T> r, T* y, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  using A = acc_t<T>;
  const V rv(r), mv(mean);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    L::load(x + j, a, b);
    a = (a - mv) * rv;
    b = (b - mv) * rv;
    if (w != nullptr) {
      V wa, wb;
      load_weight<T>(w + j, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    if (bias != nullptr) {
      V ba, bb;
      load_weight<T>(bias + j, ba, bb);
      a = a + ba;
      b = b + bb;
    }
    L::store(y + j, a, b);
  }
  for (; j < n; ++j) {
    A v = (to_acc(x[j]) - mean) * r;
    if (w != nullptr) v *= static_cast<A>(w[j]);
    if (bias != nullptr) v += static_cast<A>(bias[j]);
    y[j] = static_cast<T>(v);
  }
}

template <typename T, typename W>
void row_backward(const T* g, const T* x, const W* w, acc_t<T> mean, acc_t<T> r, T* dx, acc_t<T>* pdw,
                  acc_t<T>* pdb, int64_t n) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  using V = typename L::V;
  const V rv(r), mv(mean);
  V s1a(0), s1b(0), s2a(0), s2b(0);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V ga, gb, xa, xb;
    L::load(g + j, ga, gb);
    L::load(x + j, xa, xb);
    xa = xa - mv;
    xb = xb - mv;
    if (pdw != nullptr) {
      V pa, pb;
      LA::load(pdw + j, pa, pb);
      LA::store(pdw + j, at::vec::fmadd(ga * xa, rv, pa), at::vec::fmadd(gb * xb, rv, pb));
    }
    if (pdb != nullptr) {
      V pa, pb;
      LA::load(pdb + j, pa, pb);
      LA::store(pdb + j, pa + ga, pb + gb);
    }
    if (w != nullptr) {
      V wa, wb;
      load_weight<T>(w + j, wa, wb);
      ga = ga * wa;
      gb = gb * wb;
    }
    s1a = s1a + ga;
    s1b = s1b + gb;
    s2a = at::vec::fmadd(ga, xa, s2a);
    s2b = at::vec::fmadd(gb, xb, s2b);
  }
  A s1 = hsum(s1a + s1b), s2 = hsum(s2a + s2b);
  for (; j < n; ++j) {
    const A gj = to_acc(g[j]), xj = to_acc(x[j]) - mean;
    if (pdw != nullptr) pdw[j] += gj * xj * r;
    if (pdb != nullptr) pdb[j] += gj;
    const A gw = w != nullptr ? gj * static_cast<A>(w[j]) : gj;
    s1 += gw;
    s2 += gw * xj;
  }

  // dx = r * gw + c0 - xc * c1
  const A inv_n = A(1) / static_cast<A>(n);
  const A c0 = -r * s1 * inv_n, c1 = r * r * r * s2 * inv_n;
  const V c0v(c0), c1v(c1);
  j = 0;
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
    L::store(dx + j, at::vec::fmadd(rv, ga, c0v) - (xa - mv) * c1v, at::vec::fmadd(rv, gb, c0v) - (xb - mv) * c1v);
  }
  for (; j < n; ++j) {
    const A gw = to_acc(g[j]) * (w != nullptr ? static_cast<A>(w[j]) : A(1));
    dx[j] = static_cast<T>(r * gw + c0 - (to_acc(x[j]) - mean) * c1);
  }
}

}  // namespace

// w, b null: no affine parameters. mean and rstd have acc_t<T> (float, or double).
void layer_norm_fwd(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const void* x, const void* w,
                    const void* b, void* y, void* mean, void* rstd, int64_t rows, int64_t n, double eps) {
  dispatch_float_weight(x_dtype, w_dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    const W* wp = static_cast<const W*>(w);
    const W* bp = static_cast<const W*>(b);
    T* yp = static_cast<T*>(y);
    A* mp = static_cast<A*>(mean);
    A* rs = static_cast<A*>(rstd);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* row = xp + i * n;
        const A m = row_sum(row, n) / static_cast<A>(n);
        const A var = row_centered_sumsq(row, m, n) / static_cast<A>(n);
        const A r = static_cast<A>(1.0 / std::sqrt(static_cast<double>(var) + eps));
        mp[i] = m;
        rs[i] = r;
        row_normalize(row, wp, bp, m, r, yp + i * n, n);
      }
    });
  });
}

// dw / db null: that gradient is not wanted (or the parameter does not exist). Partial sums per chunk
// of rows in acc_t, then summed across chunks and rounded once to the parameter's dtype.
void layer_norm_bwd(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const void* g, const void* x,
                    const void* w, const void* mean, const void* rstd, void* dx, void* dw, void* db,
                    int64_t rows, int64_t n) {
  dispatch_float_weight(x_dtype, w_dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = acc_t<T>;
    const T* gp = static_cast<const T*>(g);
    const T* xp = static_cast<const T*>(x);
    const W* wp = static_cast<const W*>(w);
    const A* mp = static_cast<const A*>(mean);
    const A* rs = static_cast<const A*>(rstd);
    T* dxp = static_cast<T*>(dx);
    const RowChunks chunks(rows, n);
    std::vector<A> pdw(dw != nullptr ? chunks.count * n : 0, A(0));
    std::vector<A> pdb(db != nullptr ? chunks.count * n : 0, A(0));
    at::parallel_for(0, chunks.count, 1, [&](int64_t cbegin, int64_t cend) {
      for (int64_t c = cbegin; c < cend; ++c) {
        A* aw = dw != nullptr ? pdw.data() + c * n : nullptr;
        A* ab = db != nullptr ? pdb.data() + c * n : nullptr;
        for (int64_t i = chunks.begin(c); i < chunks.end(c); ++i) {
          row_backward(gp + i * n, xp + i * n, wp, mp[i], rs[i], dxp + i * n, aw, ab, n);
        }
      }
    });
    if (dw != nullptr) sum_partials(pdw, chunks.count, n, static_cast<W*>(dw));
    if (db != nullptr) sum_partials(pdb, chunks.count, n, static_cast<W*>(db));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
