// An operand of a row-wise kernel (bias_act, glu): rows of contiguous elements, row i starting
// i * row_stride elements after ptr. Plain structs, shared by the op files and the per-ISA kernels.
#pragma once

#include <cstdint>

namespace torchfast {

struct RowPtr {
  const void* ptr;
  int64_t row_stride;
};

struct RowPtrMut {
  void* ptr;
  int64_t row_stride;
};

}  // namespace torchfast
