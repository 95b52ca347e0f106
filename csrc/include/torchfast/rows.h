// Row views for the row-wise kernels (bias_act, glu): an operand is `rows` rows of `cols` contiguous
// elements, row i starting `i * row_stride` elements after the first. Such a view covers contiguous
// tensors and also the two halves of a packed [..., 2H] tensor (row stride 2H), so the packed forms
// of swiglu/geglu read and write their halves in place, without a split copy.
// Host code only (op files); the kernels see just the RowPtr structs (row_ptr.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <torchfast/row_ptr.h>

#include <optional>
#include <utility>

namespace torchfast {

// The row stride of `t` seen as [numel / size(-1), size(-1)] rows with contiguous last dimension, or
// nullopt when its leading dimensions do not collapse to one stride (or the last one is not
// contiguous). A tensor with one row (or none) gets row stride size(-1).
inline std::optional<int64_t> row_stride(const at::Tensor& t) {
  if (t.dim() == 0) return 1;
  const int64_t cols = t.size(-1);
  if (cols > 1 && t.stride(-1) != 1) return std::nullopt;
  int64_t stride = -1, next = 0;  // stride of the innermost leading dim > 1; stride the next must have
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (stride < 0) {
      stride = t.stride(d);
    } else if (t.stride(d) != next) {
      return std::nullopt;
    }
    next = t.stride(d) * t.size(d);
  }
  return stride < 0 ? cols : stride;
}

inline int64_t num_rows(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : (t.size(-1) == 0 ? 0 : t.numel() / t.size(-1));
}

// `t` itself when it is a row view, otherwise a contiguous copy; and its row pointer.
inline std::pair<at::Tensor, RowPtr> as_rows(const at::Tensor& t) {
  if (auto rs = row_stride(t)) return {t, RowPtr{t.const_data_ptr(), *rs}};
  at::Tensor c = t.contiguous();
  return {c, RowPtr{c.const_data_ptr(), c.dim() == 0 ? 1 : c.size(-1)}};
}

}  // namespace torchfast
