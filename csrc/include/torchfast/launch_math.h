// The host-side arithmetic of torchfast's CUDA launches: grid sizes, threads per row, the index type of
// a grid-stride loop, the row slices of a column reduction. Plain C++17 with no CUDA or torch header, so
// that tests/csrc/launch_math_check.cpp compiles this very file on a machine without a GPU and checks it
// at sizes past 2^31 (tests/test_cuda_launch_math.py). The CUDA helpers (cuda_utils.cuh, norm_cuda.cuh,
// act_cuda.cuh) call these with the current device's properties.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

namespace torchfast::launch {

// CUDA's limits for every architecture torchfast builds for (compute capability 5.0 and later).
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();  // 2^31 - 1 blocks
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kWarp = 32;
// The largest block a row kernel gets. Row kernels carry __launch_bounds__(kMaxRowThreads, 1), so ptxas
// keeps them within 64K / 1024 = 64 registers per thread: a block of this size can always be launched.
// (The second argument, one resident block per SM, matters: with the first alone ptxas aimed at two and
// squeezed layer_norm's kernels into 32 registers with spills.)
constexpr int kMaxRowThreads = 1024;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
// Threads per block of the elementwise and bias_act / glu row-map kernels.
constexpr int kMapThreads = 256;

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

// Blocks the device holds at once with `threads` per block (by the thread limit of an SM; at least one
// block per SM even when a block is larger than that limit allows twice).
constexpr int64_t resident_blocks(int threads, int sm_count, int max_threads_per_sm) {
  return static_cast<int64_t>(sm_count) * std::max(1, max_threads_per_sm / threads);
}

// Blocks of a grid-stride loop over `items` independent work items: one per `threads` items, at least 1
// (a launch with an empty grid is an error, and a tail-only launch must still run), and at most one wave
// of resident blocks: beyond that extra blocks only cost scheduling, the loop covers the rest. Always
// within gridDim.x's limit, whatever `items` is.
constexpr int64_t grid_stride_blocks(int64_t items, int threads, int sm_count, int max_threads_per_sm) {
  const int64_t cap = std::min(resident_blocks(threads, sm_count, max_threads_per_sm), kMaxGridX);
  return std::clamp<int64_t>(ceil_div(items, threads), 1, std::max<int64_t>(cap, 1));
}

// Threads of a row kernel's block for rows of n elements read `vec` at a time: enough to cover the row in
// one sweep, rounded up to whole warps (the block reductions' full-mask shuffles need full warps), 32 to
// kMaxRowThreads; a longer row is walked in several sweeps by a loop inside the kernel.
constexpr int row_threads(int64_t n, int vec) {
  const int64_t per_row = ceil_div(n, vec);
  return static_cast<int>(std::clamp<int64_t>(ceil_div(per_row, kWarp) * kWarp, kWarp, kMaxRowThreads));
}

// Blocks of a row kernel (one block per row, grid-stride over rows): min(rows, one wave), at least 1.
constexpr int64_t row_blocks(int64_t rows, int threads, int sm_count, int max_threads_per_sm) {
  const int64_t cap = std::min(resident_blocks(threads, sm_count, max_threads_per_sm), kMaxGridX);
  return std::clamp<int64_t>(rows, 1, std::max<int64_t>(cap, 1));
}

// Whether a grid-stride loop over `elements` elements, `vec` per step (so elements / vec steps), run by
// `grid_threads` threads in all, may count in int32 (bias_act and glu pick their index type with this).
// Two things must fit: the element count itself (the kernels compute rows * cols and v * vec in the index
// type), and the loop variable's last value, which is (steps - 1) + grid_threads: the loop adds the grid
// stride once more before it finds itself past the end. Checking only the element count lets that last
// addition wrap to a negative index, which still passes `v < steps`, for element counts within
// grid_threads of 2^31 - 1.
constexpr bool fits_int32_loop(int64_t elements, int vec, int64_t grid_threads) {
  if (elements < 0 || elements > kInt32Max) return false;
  const int64_t steps = elements / vec;
  return steps - 1 + grid_threads <= kInt32Max;
}

// The launch of a bias_act / glu map over `elements` elements, `vec` at a time (act_cuda.cuh,
// launch_rows): the grid, and whether the kernel may index in int32 (else int64).
struct MapLaunch {
  int64_t blocks;
  bool int32;
};

constexpr MapLaunch map_launch(int64_t elements, int vec, int sm_count, int max_threads_per_sm) {
  const int64_t blocks = grid_stride_blocks(elements / vec, kMapThreads, sm_count, max_threads_per_sm);
  return {blocks, fits_int32_loop(elements, vec, blocks * kMapThreads)};
}

// Row slices (gridDim.y) of a column reduction whose blocks take `cols_per_block` columns and
// `row_threads` rows at a time: about `blocks_per_sm` blocks per SM in all, at least 1, at most one slice
// per row_threads rows, and never more than gridDim.y allows.
constexpr int64_t column_reduce_slices(int64_t rows, int64_t cols, int cols_per_block, int row_threads,
                                       int sm_count, int blocks_per_sm = 8) {
  const int64_t col_blocks = ceil_div(cols, cols_per_block);
  const int64_t want = static_cast<int64_t>(blocks_per_sm) * sm_count;
  const int64_t most = std::min(ceil_div(rows, row_threads), kMaxGridYZ);
  return std::clamp<int64_t>(ceil_div(want, col_blocks), 1, std::max<int64_t>(most, 1));
}

}  // namespace torchfast::launch
