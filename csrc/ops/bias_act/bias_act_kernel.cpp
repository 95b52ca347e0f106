// bias_act CPU kernels, compiled once per ISA (see csrc/include/torchfast/cpu_isa.h).
//
//   forward:  y[r, c]  = act(x[r, c] + b[c])
//   backward: dx[r, c] = dy[r, c] * act'(x[r, c] + b[c]),   db[c] = sum_r dx[r, c]
//
// The bias arrives already widened to the compute type (float, or double for float64): it is one row,
// so converting it once costs nothing and each step loads it without a conversion. bf16/fp16 data are
// widened to fp32 per vector and rounded once on store. On AVX2: swish runs its exponential in a pass
// of its own (with_split_blocks, rowmap.h), relu has loops of its own (relu_fwd_bf16_unpacked,
// relu_bwd_masked), and gelu / gelu_tanh without a bias go through float blocks (kStageBlocks). The bias gradient is summed in the compute type from the unrounded dx, in per-task partial
// rows that are added up at the end: no atomics, and the same result on every run with the same
// thread count.
#include <torchfast/activations.h>
#include <torchfast/rowmap.h>

#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torchfast::cpu {
namespace CPU_CAPABILITY {

namespace {

// Calls fn(T{}, Act{}, has_bias) with compile-time types for the dtype, the activation and whether
// there is a bias, so the inner loops carry no branch on any of them.
template <typename Fn>
void dispatch(c10::ScalarType dtype, int act, bool has_bias, const Fn& fn) {
  dispatch_float(dtype, [&](auto tag) {
    dispatch_act<decltype(tag)>(act, [&](auto a) {
      if (has_bias) {
        fn(tag, a, std::true_type{});
      } else {
        fn(tag, a, std::false_type{});
      }
    });
  });
}

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }


// Whether the AVX2 kernels stage bf16/fp16 through float blocks (with_float_blocks). Measured per op
// on one AVX2 core (bf16 2048x4096, process CPU time, min of 15 blocks, against the one-step loop):
// without a bias, swish backward 16% and gelu forward 6% faster; with a bias, no gain (swish a tie,
// gelu 8-15% and relu 20-40% slower), and relu, whose arithmetic is one max, gains nothing from the
// shorter loops either. So only bias-free, non-relu calls take the blocks. Also tried: with a bias,
// adding it to the staged block in a loop of its own before the activation loop (bit-equal results):
// 0-10% slower than the one-step loop for swish, gelu and gelu_tanh, so not kept. (Swish, with or
// without a bias, now takes with_split_blocks instead: kSplitExp.)
template <typename A, typename HasBias>
inline constexpr bool kStageBlocks = !HasBias::value && !std::is_same_v<A, Relu>;

// v = x[i, i + n) widened, plus bias[i, i + n) (compute type, or T) when there is one.
template <typename HasBias, typename T, typename B, typename V, int kN>
inline void load_biased(const T* x, const B* bias, int64_t i, int64_t n, V (&v)[kN]) {
  using L = MapLanes<T>;
  L::load(x + i, n, v);
  if constexpr (HasBias::value) {
    V b[kN];
    if constexpr (std::is_same_v<B, T>) {
      L::load(bias + i, n, b);
    } else {
      L::load_c(bias + i, n, b);
    }
    for (int k = 0; k < kN; ++k) v[k] = v[k] + b[k];
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The bits of round_bf16(v) in the low half of each 32-bit lane: to nearest even, NaN -> 0xffff, the
// lanes of at::vec's float -> bf16 conversion on AVX2 before its packing.
inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), u), 16);
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}

// relu(x + b) for bf16 on AVX2 over the whole steps of 16 in [0, len); returns how many it did.
// Widens by interleaving with zeros (unpacklo/hi_epi16: v_lo holds elements 0-3 and 8-11, v_hi 4-7
// and 12-15) instead of at::vec's extract + zero-extend + shift, loads the float bias in that order,
// and packs the rounded halves back with packus_epi32, which restores the natural order without
// at::vec's cross-lane permute. The values and their rounding are those of the general loop; bf16
// 64x4096 with a bias, one AVX2 core: 0.25 -> 0.22 ns per element (without a bias 0.21 -> 0.16).
template <typename HasBias>
int64_t relu_fwd_bf16_unpacked(const c10::BFloat16* x, const c10::BFloat16* bias, c10::BFloat16* y,
                               int64_t len) {
  const __m256i zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    if constexpr (HasBias::value) {
      const __m256i braw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + i));
      lo = _mm256_add_ps(lo, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, braw)));
      hi = _mm256_add_ps(hi, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, braw)));
    }
    // Relu::fwd: 0 where v <= 0 (NaN kept)
    lo = _mm256_andnot_ps(_mm256_cmp_ps(lo, _mm256_setzero_ps(), _CMP_LE_OQ), lo);
    hi = _mm256_andnot_ps(_mm256_cmp_ps(hi, _mm256_setzero_ps(), _CMP_LE_OQ), hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi)));
  }
  return i;
}

// relu's backward on AVX2 for bf16/fp16: dx = dy where !(x + b <= 0), else 0. dy is already in T, so
// dx is dy's own bits under a mask; only x is widened (for the comparison) and dx for the bias
// gradient. The general loop widens dy, blends in float and rounds it back: the same values (the
// rounding of a widened T is exact), but the emulated rounding was a third of the loop's instructions
// (bf16 64x4096 with a bias, dx and db, one AVX2 core: 0.32 -> 0.25 ns per element).
// (A NaN in dy keeps its payload here; the rounding turned it into 0xffff. Both are NaN.)
template <typename HasBias, typename T, typename C>
void relu_bwd_masked(const T* g, const T* x, const T* bias, T* dx, C* acc, int64_t len) {
  using L = MapLanes<T>;
  using V = typename L::V;
  using R = Vectorized<T>;
  for_steps<L>(len, [&](int64_t i, int64_t n) {
    V v[L::kN];
    load_biased<HasBias>(x, bias, i, n, v);
    // lanes where x + b <= 0, packed from two vectors of 32-bit lanes to one of 16 (the order fixed
    // by the permute, as in at::vec's float -> bf16 packing)
    const __m256i m32lo = _mm256_castps_si256(_mm256_cmp_ps(v[0], _mm256_setzero_ps(), _CMP_LE_OQ));
    const __m256i m32hi = _mm256_castps_si256(_mm256_cmp_ps(v[1], _mm256_setzero_ps(), _CMP_LE_OQ));
    const __m256i m16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(m32lo, m32hi), 0xd8);
    const R graw = n == L::kWidth ? R::loadu(g + i) : R::loadu(g + i, n);
    const R d(_mm256_andnot_si256(m16, graw));
    n == L::kWidth ? d.store(dx + i) : d.store(dx + i, n);
    if (acc != nullptr) {
      V s[L::kN], df[L::kN];
      std::tie(df[0], df[1]) = at::vec::convert_to_float<T>(d);
      L::load_c(acc + i, n, s);
      for (int k = 0; k < L::kN; ++k) s[k] = s[k] + df[k];
      L::store_c(acc + i, n, s);
    }
  });
}
#endif

}  // namespace

void bias_act_fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr x, const void* bias,
                  RowPtrMut y) {
  dispatch(dtype, act, bias != nullptr, [&](auto tag, auto a, auto has_bias) {
    using T = decltype(tag);
    using A = decltype(a);
    using L = MapLanes<T>;
    using C = typename L::C;
    using V = typename L::V;
    const C* bias_c = static_cast<const C*>(bias);
#if defined(CPU_CAPABILITY_AVX2)
    // relu_fwd_bf16_unpacked reads the bias as bf16 again: it was widened from x's dtype (bias_act.h
    // checks that they match), so rounding it back is exact.
    std::vector<c10::BFloat16> bias_bf16;
    if constexpr (std::is_same_v<A, Relu> && std::is_same_v<T, c10::BFloat16> && decltype(has_bias)::value) {
      bias_bf16.assign(bias_c, bias_c + cols);
    }
#endif
    parallel_rows(rows, cols, [&](int64_t r, int64_t c0, int64_t len) {
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<A, Relu> && std::is_same_v<T, c10::BFloat16>) {
        // whole steps of 16 here; the rest (< 16 elements) by the general loop below
        const int64_t done = relu_fwd_bf16_unpacked<decltype(has_bias)>(
            row<T>(x, r) + c0, decltype(has_bias)::value ? bias_bf16.data() + c0 : nullptr, row<T>(y, r) + c0,
            len);
        c0 += done;
        len -= done;
      }
#endif
      if constexpr (kSplitExp<T, A>) {
        const T* xp = row<T>(x, r) + c0;
        const C* bp = decltype(has_bias)::value ? bias_c + c0 : nullptr;
        T* yp = row<T>(y, r) + c0;
        with_split_blocks<T, A>(
            len, [&](int64_t i, int64_t n, V (&v)[L::kN]) { load_biased<decltype(has_bias)>(xp, bp, i, n, v); },
            [&](int64_t b, int64_t count, const float* xf, const float* ef) {
          for_steps<L>(count, [&](int64_t i, int64_t n) {
            V v[L::kN], e[L::kN];
            L::load_c(xf + i, n, v);
            L::load_c(ef + i, n, e);
            for (int k = 0; k < L::kN; ++k) v[k] = A::fwd_from(v[k], e[k]);
            L::store(yp + b + i, n, v);
          });
        });
        return;
      }
      with_float_blocks<T, kStageBlocks<A, decltype(has_bias)>>(
          len, std::array<const T*, 1>{row<T>(x, r) + c0}, std::array<T*, 1>{row<T>(y, r) + c0},
          [&](int64_t off, int64_t count, const auto& in, const auto& out) {
        using LE = LanesOf<decltype(out)>;
        for_steps<LE>(count, [&](int64_t i, int64_t n) {
          V v[LE::kN];
          LE::load(in[0] + i, n, v);
          if constexpr (decltype(has_bias)::value) {
            V b[LE::kN];
            LE::load_c(bias_c + c0 + off + i, n, b);
            for (int k = 0; k < LE::kN; ++k) v[k] = v[k] + b[k];
          }
          for (int k = 0; k < LE::kN; ++k) v[k] = A::fwd(v[k]);
          LE::store(out[0] + i, n, v);
        });
      });
    });
  });
}

// dbias (compute type, `cols` elements, or null when no bias gradient is wanted) is overwritten.
void bias_act_bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr x,
                  const void* bias, RowPtrMut grad_in, void* dbias) {
  dispatch(dtype, act, bias != nullptr, [&](auto tag, auto a, auto has_bias) {
    using T = decltype(tag);
    using A = decltype(a);
    using L = MapLanes<T>;
    using C = typename L::C;
    using V = typename L::V;
    const C* bias_c = static_cast<const C*>(bias);

#if defined(CPU_CAPABILITY_AVX2)
    // relu_bwd_masked reads the bias in T again (exact: it was widened from x's dtype, which bias_act.h
    // checks it has): half the bytes of the float row. At 4096 columns and more, with the float bias
    // and partial-sum rows, a row's operands outgrew L1: bf16, one AVX2 core, 0.23 ns per element at
    // 1024 columns against 0.45 at 4096.
    std::vector<T> bias_t;
    if constexpr (std::is_same_v<A, Relu> && uses_float_blocks_v<T> && decltype(has_bias)::value) {
      bias_t.assign(bias_c, bias_c + cols);
    }
#endif
    // dx for columns [c0, c0 + len) of row r; adds it to acc[c0 ...] when acc is given.
    auto segment = [&](int64_t r, int64_t c0, int64_t len, C* acc) {
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<A, Relu> && uses_float_blocks_v<T>) {
        relu_bwd_masked<decltype(has_bias)>(row<T>(grad_out, r) + c0, row<T>(x, r) + c0,
                                            decltype(has_bias)::value ? bias_t.data() + c0 : nullptr,
                                            row<T>(grad_in, r) + c0, acc != nullptr ? acc + c0 : nullptr, len);
        return;
      }
#endif
      if constexpr (kSplitExp<T, A>) {
        const T* gp = row<T>(grad_out, r) + c0;
        const T* xp = row<T>(x, r) + c0;
        const C* bp = decltype(has_bias)::value ? bias_c + c0 : nullptr;
        T* dxp = row<T>(grad_in, r) + c0;
        with_split_blocks<T, A>(
            len, [&](int64_t i, int64_t n, V (&v)[L::kN]) { load_biased<decltype(has_bias)>(xp, bp, i, n, v); },
            [&](int64_t b, int64_t count, const float* xf, const float* ef) {
          for_steps<L>(count, [&](int64_t i, int64_t n) {
            V g[L::kN], v[L::kN], e[L::kN];
            L::load(gp + b + i, n, g);
            L::load_c(xf + i, n, v);
            L::load_c(ef + i, n, e);
            for (int k = 0; k < L::kN; ++k) {  // A::bwd's expression
              V yk, d;
              A::fwd_deriv_from(v[k], e[k], yk, d);
              g[k] = g[k] * d;
            }
            L::store(dxp + b + i, n, g);
            if (acc != nullptr) {
              V s[L::kN];
              L::load_c(acc + c0 + b + i, n, s);
              for (int k = 0; k < L::kN; ++k) s[k] = s[k] + g[k];
              L::store_c(acc + c0 + b + i, n, s);
            }
          });
        });
        return;
      }
      with_float_blocks<T, kStageBlocks<A, decltype(has_bias)>>(
          len, std::array<const T*, 2>{row<T>(grad_out, r) + c0, row<T>(x, r) + c0},
          std::array<T*, 1>{row<T>(grad_in, r) + c0},
          [&](int64_t off, int64_t count, const auto& in, const auto& out) {
        using LE = LanesOf<decltype(out)>;
        for_steps<LE>(count, [&](int64_t i, int64_t n) {
          V g[LE::kN], v[LE::kN];
          LE::load(in[0] + i, n, g);
          LE::load(in[1] + i, n, v);
          if constexpr (decltype(has_bias)::value) {
            V b[LE::kN];
            LE::load_c(bias_c + c0 + off + i, n, b);
            for (int k = 0; k < LE::kN; ++k) v[k] = v[k] + b[k];
          }
          for (int k = 0; k < LE::kN; ++k) g[k] = A::bwd(g[k], v[k]);
          LE::store(out[0] + i, n, g);
          if (acc != nullptr) {
            V s[LE::kN];
            LE::load_c(acc + c0 + off + i, n, s);
            for (int k = 0; k < LE::kN; ++k) s[k] = s[k] + g[k];
            LE::store_c(acc + c0 + off + i, n, s);
          }
        });
      });
    };

    C* db = static_cast<C*>(dbias);
    if (db == nullptr) {
      parallel_rows(rows, cols, [&](int64_t r, int64_t c0, int64_t len) { segment(r, c0, len, nullptr); });
      return;
    }
    std::fill(db, db + cols, C(0));
    if (rows == 0 || cols == 0) return;
    // Tasks: row_chunks x col_blocks, at most one per thread and none below kGrain elements. Each row
    // chunk sums into its own partial row (the first one straight into db); column blocks split wide
    // rows when there are fewer rows than threads.
    const int64_t max_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows * cols / kGrain));
    const int64_t row_chunks = std::min(rows, max_tasks);
    const int64_t want_blocks = std::min(div_up(max_tasks, row_chunks), std::max<int64_t>(1, cols / 256));
    const int64_t block = div_up(div_up(cols, want_blocks), L::kWidth) * L::kWidth;
    const int64_t col_blocks = div_up(cols, block);
    std::vector<C> partial((row_chunks - 1) * cols, C(0));
    at::parallel_for(0, row_chunks * col_blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t rc = t / col_blocks, cb = t % col_blocks;
        const int64_t r0 = rc * rows / row_chunks, r1 = (rc + 1) * rows / row_chunks;
        const int64_t c0 = cb * block, len = std::min(cols, c0 + block) - c0;
        C* acc = rc == 0 ? db : partial.data() + (rc - 1) * cols;
        for (int64_t r = r0; r < r1; ++r) segment(r, c0, len, acc);
      }
    });
    for (int64_t rc = 1; rc < row_chunks; ++rc) {  // (row_chunks - 1) * cols adds: small next to rows * cols
      const C* p = partial.data() + (rc - 1) * cols;
      for_steps<L>(cols, [&](int64_t i, int64_t n) {
        V s[L::kN], q[L::kN];
        L::load_c(db + i, n, s);
        L::load_c(p + i, n, q);
        for (int k = 0; k < L::kN; ++k) s[k] = s[k] + q[k];
        L::store_c(db + i, n, s);
      });
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
