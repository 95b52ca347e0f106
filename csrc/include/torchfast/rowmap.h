// Building blocks of the row-mapped CPU kernels (bias_act, glu): loads and stores that widen
// bfloat16/float16 to float and round back once, and the split of a rows x cols problem across
// threads. Included only by `*_kernel.cpp` files (compiled once per ISA), like elementwise.h.
#pragma once

#include <torchfast/elementwise.h>
#include <torchfast/row_ptr.h>

#include <algorithm>
#include <type_traits>

namespace torchfast::cpu {
inline namespace CPU_CAPABILITY {

// One step of a kernel over T: kN compute vectors (two float vectors per bf16/fp16 vector, one
// otherwise), kWidth elements. C is the compute scalar: double for double, float otherwise.
template <typename T>
struct MapLanes {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using V = Vectorized<C>;
  static constexpr int kN = at::vec::is_reduced_floating_point_v<T> ? 2 : 1;
  static constexpr int64_t kWidth = kN * V::size();

  // The `count` (<= kWidth) elements at p, widened; lanes past count are zero.
  static void load(const T* p, int64_t count, V (&v)[kN]) {
    if constexpr (kN == 2) {
      using R = Vectorized<T>;
      R raw = count == kWidth ? R::loadu(p) : R::loadu(p, count);
      std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(raw);
    } else {
      v[0] = count == kWidth ? V::loadu(p) : V::loadu(p, count);
    }
  }

  static void store(T* p, int64_t count, const V (&v)[kN]) {
    if constexpr (kN == 2) {
      Vectorized<T> raw = round_to<T>(v[0], v[1]);
      count == kWidth ? raw.store(p) : raw.store(p, count);
    } else {
      count == kWidth ? v[0].store(p) : v[0].store(p, count);
    }
  }

  // Loads and stores of compute-typed buffers (bias, gradient accumulators).
  // In the AVX2 build a full step takes a branch-free path first: with only the general loop, GCC kept
  // these out of line there, a call per vector in the bias gradient loop. Not in the AVX-512 builds:
  // there GCC then split the general loop into an out-of-line part, and bf16 bias_act backward with a
  // bias ran 25-40% slower (AVX512_BF16, 2048x4096, two of three alternating runs).
  static void load_c(const C* p, int64_t count, V (&v)[kN]) {
#if defined(CPU_CAPABILITY_AVX2)
    if (count == kWidth) {
      for (int k = 0; k < kN; ++k) v[k] = V::loadu(p + k * V::size());
      return;
    }
#endif
    for (int k = 0; k < kN; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * V::size(), 0, V::size());
      v[k] = n == V::size() ? V::loadu(p + k * V::size()) : (n > 0 ? V::loadu(p + k * V::size(), n) : V(0));
    }
  }

  static void store_c(C* p, int64_t count, const V (&v)[kN]) {
#if defined(CPU_CAPABILITY_AVX2)
    if (count == kWidth) {
      for (int k = 0; k < kN; ++k) v[k].store(p + k * V::size());
      return;
    }
#endif
    for (int k = 0; k < kN; ++k) {
      const int64_t n = std::clamp<int64_t>(count - k * V::size(), 0, V::size());
      if (n == V::size()) {
        v[k].store(p + k * V::size());
      } else if (n > 0) {
        v[k].store(p + k * V::size(), n);
      }
    }
  }
};

// The MapLanes of an operand array handed to a with_float_blocks body (float, or T itself).
template <typename Ptrs>
using LanesOf =
    MapLanes<std::remove_cv_t<std::remove_pointer_t<typename std::remove_cvref_t<Ptrs>::value_type>>>;

// fn(offset, count) over [0, len) in steps of kWidth, the last step possibly partial.
template <typename L, typename Fn>
inline void for_steps(int64_t len, const Fn& fn) {
  int64_t i = 0;
  for (; i + L::kWidth <= len; i += L::kWidth) fn(i, L::kWidth);
  if (i < len) fn(i, len - i);
}

// Splits rows x cols elements into chunks of about kGrain for at::parallel_for, and calls
// seg(row, col, len) for each run of one row inside a chunk.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t cols, const Fn& seg) {
  if (rows <= 0 || cols <= 0) return;
  at::parallel_for(0, rows * cols, kGrain, [&](int64_t begin, int64_t end) {
    int64_t r = begin / cols, c = begin % cols;
    while (begin < end) {
      const int64_t len = std::min(cols - c, end - begin);
      seg(r, c, len);
      begin += len;
      ++r;
      c = 0;
    }
  });
}

// The AVX2 loop for activations whose exponential is split out (kSplitExp, activations.h), on bf16/fp16:
// over blocks of kFloatBlock elements of [0, len), a first pass loads the activation's inputs
// (load(i, count, v): the count <= kWidth inputs at element i, widened, bias added), keeps them in the
// float buffer xf and stores e = A::pre(x) in ef; then body(offset, count, xf, ef) finishes the block:
// it loads xf and ef, widens its other operands itself and rounds straight into the outputs.
// Measured against with_float_blocks (which widens every operand into a buffer and runs the whole
// activation in one loop over them), bf16 swiglu forward, 64x4096, one AVX2 core: 0.47 vs 0.51 ns
// per element. Where the whole activation sat in one loop, the exponential's long dependency chain
// (about 15 instructions) and the division behind it left too few iterations in flight; in a loop of
// its own, the exponential of many vectors overlaps, and the second loop's chain is short enough to
// take the widening and the rounding as well (with the exponential in it, rounding there was 20% slower).
template <typename T, typename A, typename Load, typename Body>
inline void with_split_blocks(int64_t len, const Load& load, const Body& body) {
  using L = MapLanes<T>;
  using V = typename L::V;
  alignas(64) float xf[kFloatBlock];
  alignas(64) float ef[kFloatBlock];
  for (int64_t b = 0; b < len; b += kFloatBlock) {
    const int64_t n = std::min(kFloatBlock, len - b);
    for_steps<L>(n, [&](int64_t i, int64_t count) {
      V v[L::kN];
      load(b + i, count, v);
      L::store_c(xf + i, count, v);
      for (int k = 0; k < L::kN; ++k) v[k] = A::pre(v[k]);
      L::store_c(ef + i, count, v);
    });
    body(b, n, static_cast<const float*>(xf), static_cast<const float*>(ef));
  }
}

template <typename T>
inline const T* row(const RowPtr& p, int64_t r) {
  return static_cast<const T*>(p.ptr) + r * p.row_stride;
}

template <typename T>
inline T* row(const RowPtrMut& p, int64_t r) {
  return static_cast<T*>(p.ptr) + r * p.row_stride;
}

}  // namespace CPU_CAPABILITY
}  // namespace torchfast::cpu
