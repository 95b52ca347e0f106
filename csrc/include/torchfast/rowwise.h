// Building blocks for the row-wise CPU kernels (normalizations): a row is `n` contiguous elements,
// rows are split across threads, and each row is walked with vectors of fp32 (fp64 for double).
// Included only by `*_kernel.cpp` files, which are compiled once per ISA; everything sits in an
// ISA-specific namespace, like elementwise.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include <torchfast/elementwise.h>

namespace torchfast::cpu {
inline namespace CPU_CAPABILITY {

// What the statistics and the math run in: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// K elements of T held as two vectors of acc_t<T>. For bf16/fp16 that is exactly one
// Vectorized<T> (one load, one widening); for float/double it is two loads, which unrolls the row
// loops by two so that the two accumulators hide the latency of the FMAs.
template <typename T>
struct Lanes {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr bool kReduced = !std::is_same_v<T, A>;
  static constexpr int64_t K = 2 * V::size();
  static_assert(!kReduced || Vectorized<T>::size() == K, "a reduced vector must widen to two");

  static inline void load(const T* p, V& a, V& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {
      a = V::loadu(p);
      b = V::loadu(p + V::size());
    }
  }

  static inline void store(T* p, const V& a, const V& b) {
    if constexpr (kReduced) {
      round_to<T>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + V::size());
    }
  }
};

// Loads K weights as the vectors of the activation type T. The weight W is T or (for bf16/fp16
// activations, the mixed-precision case) float; either way it arrives as acc_t<T> lanes.
template <typename T, typename W>
inline void load_weight(const W* w, typename Lanes<T>::V& a, typename Lanes<T>::V& b) {
  static_assert(std::is_same_v<acc_t<W>, acc_t<T>>, "weight and activation must share the math type");
  Lanes<W>::load(w, a, b);
}

// Sum of the lanes, in lane order (deterministic for a given ISA).
template <typename A>
inline A hsum(const Vectorized<A>& v) {
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

template <typename T>
inline acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

// Rows per task for at::parallel_for: about kGrain elements of work per task.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)); }

// Splits `rows` into at most one chunk per thread (fewer for small inputs), so a reduction over rows
// (the weight gradient) can keep one partial-sum row per chunk: no atomics, and the result does not
// depend on which thread ran which chunk.
struct RowChunks {
  int64_t rows, count, per_chunk;
  RowChunks(int64_t rows_, int64_t n) : rows(rows_) {
    const int64_t by_work = std::max<int64_t>(1, (rows_ * n + kGrain - 1) / kGrain);
    count = std::max<int64_t>(1, std::min<int64_t>({rows_, by_work, at::get_num_threads()}));
    per_chunk = std::max<int64_t>(1, (rows_ + count - 1) / count);
    count = (rows_ + per_chunk - 1) / per_chunk;  // no empty trailing chunk; 0 when there are no rows
  }
  int64_t begin(int64_t c) const { return c * per_chunk; }
  int64_t end(int64_t c) const { return std::min(rows, (c + 1) * per_chunk); }
};

// out[j] = sum over chunks c of partial[c * n + j], rounded once to O; split across threads by column.
template <typename A, typename O>
void sum_partials(const std::vector<A>& partial, int64_t chunks, int64_t n, O* out) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      A s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[c * n + j];
      out[j] = static_cast<O>(s);
    }
  });
}

// Calls fn(T{}, W{}) for the supported (activation, weight) dtype pairs: W == T, or W == float for
// bf16/fp16 activations (fp32 master weights under AMP).
template <typename Fn>
void dispatch_float_weight(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const Fn& fn) {
  dispatch_float(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
      if (w_dtype == c10::ScalarType::Float) return fn(T{}, float{});
    }
    return fn(T{}, T{});
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
