// Argument checks and output shapes shared by the normalization ops (rms_norm, add_rms_norm,
// layer_norm) on every backend. A normalization works on rows: the last dimension of x, `n` wide,
// with every leading dimension flattened into `rows`.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torchfast/cpu_alloc.h>
#include <c10/util/Exception.h>

#include <cmath>

#include <torchfast/checks.h>

namespace torchfast {

// The dtype of the saved statistics (rstd, mean): float, or double for double activations.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_norm_input(const at::Tensor& x, const char* op, const char* arg = "x") {
  check_strided(x, op, arg);
  check_float(x, op, arg);
  TORCH_CHECK(x.dim() >= 1, "torchfast.", op, ": argument '", arg,
              "' must have at least one dimension (the last one is normalized); got a 0-d tensor");
  TORCH_CHECK(x.size(-1) > 0, "torchfast.", op, ": argument '", arg, "' has shape ", x.sizes(),
              ": its last dimension is empty, so there is nothing to normalize");
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "torchfast.", op,
              ": eps must be a finite number >= 0 (it keeps 1/sqrt(variance + eps) finite); got ", eps);
}

// weight (or bias) of a normalization: 1-D, one value per element of a row, x's dtype or (for
// bf16/fp16 activations) float32.
inline void check_norm_param(const at::Tensor& w, const at::Tensor& x, const char* op, const char* arg) {
  check_strided(w, op, arg);
  check_same_device(x, w, op, "x", arg);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "torchfast.", op, ": argument '", arg,
              "' has shape ", w.sizes(), " but x's last dimension has size ", x.size(-1), "; '", arg,
              "' must be 1-D with ", x.size(-1), " elements");
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() || (reduced && w.scalar_type() == at::kFloat),
                   "torchfast.", op, ": argument '", arg, "' has dtype ", w.scalar_type(),
                   " but 'x' has dtype ", x.scalar_type(), "; '", arg,
                   "' must have x's dtype, or float32 when x is bfloat16 or float16");
}

// Saved per-row statistics handed back to a backward op: one value per row, in stats_dtype(x).
inline void check_norm_stats(const at::Tensor& s, const at::Tensor& x, const char* op, const char* arg) {
  check_same_device(x, s, op, "x", arg);
  TORCH_CHECK(s.numel() * x.size(-1) == x.numel() && s.dim() == x.dim() - 1, "torchfast.", op,
              ": argument '", arg, "' has shape ", s.sizes(), "; expected x's shape without its last dimension (",
              x.sizes().slice(0, x.dim() - 1), ")");
  TORCH_CHECK_TYPE(s.scalar_type() == stats_dtype(x), "torchfast.", op, ": argument '", arg, "' has dtype ",
                   s.scalar_type(), "; expected ", stats_dtype(x), " for x of dtype ", x.scalar_type());
}

inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg,
                         const char* x_arg = "x") {
  check_strided(t, op, arg);
  check_same_device(t, x, op, arg, x_arg);
  check_same_dtype(t, x, op, arg, x_arg);
  check_same_shape(t, x, op, arg, x_arg);
}

// One value per row: x's shape without its last dimension.
inline at::Tensor empty_stats(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_dtype(x)));
}

// Outputs of the normalizations are contiguous (rows of n elements), whatever x's layout.
inline at::Tensor empty_rows_like(const at::Tensor& x) {
  // Large CPU outputs get the huge-page hint before their first write (cpu_alloc.h).
  return hinted(at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)));
}

inline int64_t norm_rows(const at::Tensor& x) { return x.numel() / x.size(-1); }

}  // namespace torchfast
