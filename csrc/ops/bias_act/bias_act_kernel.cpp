// bias_act CPU kernels, compiled once per ISA (see csrc/include/torchfast/cpu_isa.h).
//
//   forward:  y[r, c]  = act(x[r, c] + b[c])
//   backward: dx[r, c] = dy[r, c] * act'(x[r, c] + b[c]),   db[c] = sum_r dx[r, c]
//
// The bias arrives already widened to the compute type (float, or double for float64): it is one row,
// so converting it once costs nothing and each step loads it without a conversion. bf16/fp16 data are
// widened to fp32 per vector (on AVX2, bias-free calls: per block, see kStageBlocks) and rounded once
// on store. The bias gradient is summed in the compute type from the unrounded dx, in per-task partial
// rows that are added up at the end: no atomics, and the same result on every run with the same
// thread count.
#include <torchfast/activations.h>
#include <torchfast/rowmap.h>

#include <array>
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
// 0-10% slower than the one-step loop for swish, gelu and gelu_tanh, so not kept.
template <typename A, typename HasBias>
inline constexpr bool kStageBlocks = !HasBias::value && !std::is_same_v<A, Relu>;

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
    parallel_rows(rows, cols, [&](int64_t r, int64_t c0, int64_t len) {
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

    // dx for columns [c0, c0 + len) of row r; adds it to acc[c0 ...] when acc is given.
    auto segment = [&](int64_t r, int64_t c0, int64_t len, C* acc) {
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
