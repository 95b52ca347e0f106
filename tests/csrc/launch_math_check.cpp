// C entry points over csrc/include/torchfast/launch_math.h, the host-side launch arithmetic of the CUDA
// kernels, so that tests/test_cuda_launch_math.py can call the header's own code through ctypes on a
// machine without a GPU (the header needs no CUDA and no torch). Compiled by that test.
#include <torchfast/launch_math.h>

#include <cstdint>

namespace L = torchfast::launch;

extern "C" {
int64_t tf_grid_stride_blocks(int64_t items, int threads, int sms, int max_threads_per_sm) {
  return L::grid_stride_blocks(items, threads, sms, max_threads_per_sm);
}
int tf_row_threads(int64_t n, int vec) { return L::row_threads(n, vec); }
int64_t tf_row_blocks(int64_t rows, int threads, int sms, int max_threads_per_sm) {
  return L::row_blocks(rows, threads, sms, max_threads_per_sm);
}
int tf_fits_int32_loop(int64_t elements, int vec, int64_t grid_threads) {
  return L::fits_int32_loop(elements, vec, grid_threads) ? 1 : 0;
}
int64_t tf_map_launch(int64_t elements, int vec, int sms, int max_threads_per_sm, int* int32) {
  const L::MapLaunch m = L::map_launch(elements, vec, sms, max_threads_per_sm);
  *int32 = m.int32 ? 1 : 0;
  return m.blocks;
}
int64_t tf_column_reduce_slices(int64_t rows, int64_t cols, int cols_per_block, int row_threads, int sms) {
  return L::column_reduce_slices(rows, cols, cols_per_block, row_threads, sms);
}
int64_t tf_constant(int which) {
  switch (which) {
    case 0: return L::kMaxGridX;
    case 1: return L::kMaxGridYZ;
    case 2: return L::kMaxRowThreads;
    default: return -1;
  }
}
}
