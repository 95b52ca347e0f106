// Argument checks shared by every torchfast kernel. Each message names the op, the argument and what
// is allowed, so a user who passes the wrong thing learns how to fix it from the error alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace torchfast {

inline bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// dtype errors raise TypeError (c10::TypeError), the way torch does for wrong dtypes.
inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "torchfast.", op, ": argument '", arg,
                   "' has dtype ", t.scalar_type(),
                   "; supported dtypes are float32, float64, bfloat16 and float16");
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* arg_a, const char* arg_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "torchfast.", op, ": '", arg_a,
                   "' has dtype ", a.scalar_type(), " but '", arg_b, "' has dtype ",
                   b.scalar_type(), "; they must match");
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "torchfast.", op, ": '", arg_a, "' has shape ", a.sizes(),
              " but '", arg_b, "' has shape ", b.sizes(), "; they must match");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), "torchfast.", op, ": '", arg_a, "' is on ", a.device(),
              " but '", arg_b, "' is on ", b.device(), "; they must be on the same device");
}

inline void check_strided(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.layout() == at::kStrided, "torchfast.", op, ": argument '", arg, "' has layout ",
              t.layout(), "; only dense (strided) tensors are supported");
}

// The checks of an elementwise op's forward (`x`) and of its backward (`grad_out`, `x`), shared by
// the CPU and CUDA kernels so both backends refuse the same inputs with the same words.
inline void check_elementwise_forward(const at::Tensor& x, const char* op) {
  check_strided(x, op, "x");
  check_float(x, op, "x");
}

inline void check_elementwise_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                       const char* op) {
  check_strided(grad_out, op, "grad_out");
  check_strided(x, op, "x");
  check_float(x, op, "x");
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  check_same_shape(grad_out, x, op, "grad_out", "x");
}

// Elementwise kernels walk memory linearly, in the storage order of their output. The output is
// at::empty_like(x): a non-overlapping dense x (contiguous, channels-last, transposed...) keeps its
// strides, anything else gets the dense layout x.suggest_memory_format() names. That is exactly the
// rule the fake kernels get from torch.empty_like, so fake and real outputs always agree. Each input is
// then used as it is when it already has the output's strides, and copied into that layout otherwise.
inline at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& out) {
  if (t.strides() == out.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(out).copy_(t);
}

}  // namespace torchfast
