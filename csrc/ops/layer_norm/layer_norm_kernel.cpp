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

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {
namespace {

// mean(x), summed as shift + sum(x - shift) / n with shift = x[0]: for a row with a large mean the
// partial sums then stay at the size of the deviations instead of n * mean, whose rounding would
// otherwise dominate the error of x - mean. keep (optional) receives x widened to acc_t<T>, for the
// passes after this one.
// Both statistics loops keep four independent accumulators (two steps of L::K elements per
// iteration), so that an iteration need not wait for the previous one's add / FMA; it took about 3%
// off the AVX2 bf16 forward (64x4096), a small part of what keeping the widened row did.
template <typename T>
acc_t<T> row_mean(const T* x, int64_t n, acc_t<T>* keep = nullptr) {
  using L = Lanes<T>;
  using V = typename L::V;
  const acc_t<T> shift = to_acc(x[0]);
  const V sv(shift);
  V s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 2 * L::K <= n; j += 2 * L::K) {
    V a, b, c, d;
    L::load(x + j, a, b);
    L::load(x + j + L::K, c, d);
    if (keep != nullptr) {
      Lanes<acc_t<T>>::store(keep + j, a, b);
      Lanes<acc_t<T>>::store(keep + j + L::K, c, d);
    }
    s0 = s0 + (a - sv);
    s1 = s1 + (b - sv);
    s2 = s2 + (c - sv);
    s3 = s3 + (d - sv);
  }
  if (j + L::K <= n) {
    V a, b;
    L::load(x + j, a, b);
    if (keep != nullptr) Lanes<acc_t<T>>::store(keep + j, a, b);
    s0 = s0 + (a - sv);
    s1 = s1 + (b - sv);
    j += L::K;
  }
  acc_t<T> s = hsum((s0 + s2) + (s1 + s3));
  for (; j < n; ++j) {
    if (keep != nullptr) keep[j] = to_acc(x[j]);
    s += to_acc(x[j]) - shift;
  }
  return shift + s / static_cast<acc_t<T>>(n);
}

template <typename T>
acc_t<T> row_centered_sumsq(const T* x, acc_t<T> mean, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  const V mv(mean);
  V s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 2 * L::K <= n; j += 2 * L::K) {
    V a, b, c, d;
    L::load(x + j, a, b);
    L::load(x + j + L::K, c, d);
    a = a - mv;
    b = b - mv;
    c = c - mv;
    d = d - mv;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
    s2 = at::vec::fmadd(c, c, s2);
    s3 = at::vec::fmadd(d, d, s3);
  }
  if (j + L::K <= n) {
    V a, b;
    L::load(x + j, a, b);
    a = a - mv;
    b = b - mv;
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
    j += L::K;
  }
  acc_t<T> s = hsum((s0 + s2) + (s1 + s3));
  for (; j < n; ++j) {
    const acc_t<T> v = to_acc(x[j]) - mean;
    s += v * v;
  }
  return s;
}

// y = (x - mean) * r * w + b (w, b may be null). x is T, or T widened (X = acc_t<T>).
template <typename T, typename W, typename X>
void row_normalize(const X* x, const W* w, const W* bias, acc_t<T> mean, acc_t<T> r, T* y, int64_t n) {
  using L = Lanes<T>;
  using V = typename L::V;
  using A = acc_t<T>;
  static_assert(Lanes<X>::K == L::K, "x and y steps must match");
  const V rv(r), mv(mean);
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V a, b;
    Lanes<X>::load(x + j, a, b);
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

// 1 / sqrt(variance + eps), from the row's sum of squared deviations.
template <typename A>
A inv_std(A centered_sumsq, int64_t n, double eps) {
  const A var = centered_sumsq / static_cast<A>(n);
  return static_cast<A>(1.0 / std::sqrt(static_cast<double>(var) + eps));
}

// Whether the AVX2 forward keeps the widened row (n floats) for its variance and normalization
// passes, or takes the tiled forward below. The widened row wins while the row, its widened copy, the
// parameters and the output row fit in L1 together (32 KiB, the L1 data cache of the AVX2 cores this
// variant serves), or while x is small enough to stay in cache between calls (up to 4 MiB). Past both,
// the normalization pass reloads the widened row, weight and bias from L2 for every row while x and y
// stream through it from memory, and the tiled forward is faster. Kernel time, bf16 with fp32 weight
// and bias, one AVX2 core (the AVX2 build forced on a Zen 4), ns per element, widened / tiled
// (F.layer_norm): 4096 columns: 0.29 / 0.34 (0.34) at 256 rows, 0.35 / 0.35 (0.36) at 512 rows,
// 0.45 / 0.37 (0.39) at 1024 rows, 0.43 / 0.38 (0.43) at 2048; 0.31 / 0.41 at 4096x2048 (row fits
// in L1); 0.50 / 0.39 (0.44) at 1024x8192. Without parameters the widened row won up to 4096 columns
// (24 KiB), with bf16 ones up to 2048 (20 KiB) and tied at 3072 (30 KiB).
template <typename T, typename W>
bool keeps_widened_row(int64_t rows, int64_t n, int64_t params) {
  constexpr int64_t kL1Bytes = int64_t{32} << 10;
  constexpr int64_t kCachedBytes = int64_t{4} << 20;
  const int64_t row_bytes = n * static_cast<int64_t>(sizeof(acc_t<T>) + sizeof(T) + params * sizeof(W));
  return row_bytes <= kL1Bytes || rows * n * static_cast<int64_t>(sizeof(T)) <= kCachedBytes;
}

// The tiled forward: statistics row by row (x read from memory once, then widened again from L1 for
// the variance), then y for kNormRows rows at a time, kNormTile columns at a time, so each tile of
// weight and bias is loaded from L2 once per kNormRows rows instead of once per row. Each element
// takes the operations of the one-row loop on x (the other ISAs' path), so the values are that loop's;
// the widened-row loop can differ from both in the last bit of a few elements (a bf16 build here
// contracted its multiply and add into an FMA: 211 of 8.4M elements at 2048x4096).
constexpr int64_t kNormRows = 16;
constexpr int64_t kNormTile = 256;  // a multiple of Lanes<T>::K: only a row's last tile has a tail

template <typename T, typename W>
void rows_forward_tiled(const T* x, const W* w, const W* b, acc_t<T>* mean, acc_t<T>* rstd, T* y, int64_t count,
                        int64_t n, double eps) {
  for (int64_t r = 0; r < count; ++r) {
    const T* row = x + r * n;
    mean[r] = row_mean(row, n);
    rstd[r] = inv_std(row_centered_sumsq(row, mean[r], n), n, eps);
  }
  for (int64_t j = 0; j < n; j += kNormTile) {
    const int64_t len = std::min(kNormTile, n - j);
    const W* wj = w != nullptr ? w + j : nullptr;
    const W* bj = b != nullptr ? b + j : nullptr;
    for (int64_t r = 0; r < count; ++r) {
      row_normalize<T>(x + r * n + j, wj, bj, mean[r], rstd[r], y + r * n + j, len);
    }
  }
}

// (sum(g * w), sum(g * w * (x - mean))) over one row (w may be null).
template <typename T, typename W>
std::pair<acc_t<T>, acc_t<T>> row_sums(const T* g, const T* x, const W* w, acc_t<T> mean, int64_t n) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  const V mv(mean);
  V s1a(0), s1b(0), s2a(0), s2b(0);
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
    s1a = s1a + ga;
    s1b = s1b + gb;
    s2a = at::vec::fmadd(ga, xa - mv, s2a);
    s2b = at::vec::fmadd(gb, xb - mv, s2b);
  }
  A s1 = hsum(s1a + s1b), s2 = hsum(s2a + s2b);
  for (; j < n; ++j) {
    const A gw = to_acc(g[j]) * (w != nullptr ? static_cast<A>(w[j]) : A(1));
    s1 += gw;
    s2 += gw * (to_acc(x[j]) - mean);
  }
  return {s1, s2};
}

// Rows processed together by the backward, so each partial-sum (and weight) vector is loaded and
// stored once per kBlock rows; kBlock rows of g and x stay in L2 between the two passes.
constexpr int64_t kBlock = 4;

// Backward of `count` <= kBlock consecutive rows. Pass 1 (per row): the two row sums. Pass 2 (all
// rows at once): dx = r * g * w + c0 - (x - mean) * c1; pdw += g * (x - mean) * r; pdb += g.
template <typename T, typename W>
void rows_backward(const T* g, const T* x, const W* w, const acc_t<T>* mean, const acc_t<T>* rstd, T* dx,
                   acc_t<T>* pdw, acc_t<T>* pdb, int64_t count, int64_t n) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  using V = typename L::V;
  const A inv_n = A(1) / static_cast<A>(n);
  A m[kBlock], r[kBlock], c0[kBlock], c1[kBlock];
  for (int64_t b = 0; b < count; ++b) {
    m[b] = mean[b];
    r[b] = rstd[b];
    const auto [s1, s2] = row_sums(g + b * n, x + b * n, w, m[b], n);
    c0[b] = -r[b] * s1 * inv_n;
    c1[b] = r[b] * r[b] * r[b] * s2 * inv_n;
  }
  int64_t j = 0;
  for (; j + L::K <= n; j += L::K) {
    V wa(1), wb(1), pwa(0), pwb(0), pba(0), pbb(0);
    if (w != nullptr) load_weight<T>(w + j, wa, wb);
    if (pdw != nullptr) LA::load(pdw + j, pwa, pwb);
    if (pdb != nullptr) LA::load(pdb + j, pba, pbb);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t o = b * n + j;
      V ga, gb, xa, xb;
      L::load(g + o, ga, gb);
      L::load(x + o, xa, xb);
      const V mv(m[b]), rv(r[b]), c0v(c0[b]), c1v(c1[b]);
      xa = xa - mv;
      xb = xb - mv;
      if (pdw != nullptr) {
        pwa = at::vec::fmadd(ga * xa, rv, pwa);
        pwb = at::vec::fmadd(gb * xb, rv, pwb);
      }
      if (pdb != nullptr) {
        pba = pba + ga;
        pbb = pbb + gb;
      }
      L::store(dx + o, at::vec::fmadd(rv, ga * wa, c0v) - xa * c1v, at::vec::fmadd(rv, gb * wb, c0v) - xb * c1v);
    }
    if (pdw != nullptr) LA::store(pdw + j, pwa, pwb);
    if (pdb != nullptr) LA::store(pdb + j, pba, pbb);
  }
  for (; j < n; ++j) {
    const A wj = w != nullptr ? static_cast<A>(w[j]) : A(1);
    for (int64_t b = 0; b < count; ++b) {
      const int64_t o = b * n + j;
      const A gj = to_acc(g[o]), xc = to_acc(x[o]) - m[b];
      if (pdw != nullptr) pdw[j] += gj * xc * r[b];
      if (pdb != nullptr) pdb[j] += gj;
      dx[o] = static_cast<T>(r[b] * gj * wj + c0[b] - xc * c1[b]);
    }
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
    const int64_t params = (w != nullptr) + (b != nullptr);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      if constexpr (uses_float_blocks_v<T>) {
        if (!keeps_widened_row<T, W>(rows, n, params)) {
          for (int64_t i = begin; i < end; i += kNormRows) {
            rows_forward_tiled(xp + i * n, wp, bp, mp + i, rs + i, yp + i * n, std::min(kNormRows, end - i), n, eps);
          }
          return;
        }
        // AVX2 bf16/fp16 (keeps_widened_row): the first pass keeps the row widened and the other two
        // read it: the same values and sums, without widening twice more. With the four accumulators
        // above, bf16 forward, 64x4096, one AVX2 core (the AVX2 build forced on a Zen 4): 0.365 -> 0.30
        // ns per element, against 0.35 for F.layer_norm.
        std::vector<A> widened(n);
        A* xf = widened.data();
        for (int64_t i = begin; i < end; ++i) {
          const A m = row_mean(xp + i * n, n, xf);
          const A r = inv_std(row_centered_sumsq(static_cast<const A*>(xf), m, n), n, eps);
          mp[i] = m;
          rs[i] = r;
          row_normalize<T>(static_cast<const A*>(xf), wp, bp, m, r, yp + i * n, n);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const T* row = xp + i * n;
          const A m = row_mean(row, n);
          const A r = inv_std(row_centered_sumsq(row, m, n), n, eps);
          mp[i] = m;
          rs[i] = r;
          row_normalize<T>(row, wp, bp, m, r, yp + i * n, n);
        }
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
        for (int64_t i = chunks.begin(c); i < chunks.end(c); i += kBlock) {
          const int64_t count = std::min(kBlock, chunks.end(c) - i);
          rows_backward(gp + i * n, xp + i * n, wp, mp + i, rs + i, dxp + i * n, aw, ab, count, n);
        }
      }
    });
    if (dw != nullptr) sum_partials(pdw, chunks.count, n, static_cast<W*>(dw));
    if (db != nullptr) sum_partials(pdb, chunks.count, n, static_cast<W*>(db));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
