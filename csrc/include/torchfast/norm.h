// Argument checks and output shapes shared by the normalization ops (rms_norm, add_rms_norm,
// layer_norm) on every backend. A normalization works on rows: the last dimension of x, `n` wide,
// with every leading dimension flattened into `rows`.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torchfast/cpu_alloc.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

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
  TORCH_CHECK(s.sizes() == x.sizes().slice(0, x.dim() - 1), "torchfast.", op,
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

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mut_ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->mutable_data_ptr() : nullptr;
}

// Checked affine parameters, contiguous (undefined when absent), and the one dtype the kernels read
// them as: weight and bias follow the same rule (x's dtype, or float32 for bf16/fp16 x) and, when
// both are given, must agree.
struct NormParams {
  at::Tensor w, b;
  c10::ScalarType dtype;
};

inline NormParams norm_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& x, const char* op) {
  NormParams p{at::Tensor(), at::Tensor(), x.scalar_type()};
  if (weight.has_value() && weight->defined()) {
    check_norm_param(*weight, x, op, "weight");
    p.w = weight->contiguous();
    p.dtype = p.w.scalar_type();
  }
  if (bias.has_value() && bias->defined()) {
    check_norm_param(*bias, x, op, "bias");
    if (p.w.defined()) check_same_dtype(p.w, *bias, op, "weight", "bias");
    p.b = bias->contiguous();
    p.dtype = p.b.scalar_type();
  }
  return p;
}

// Everything a forward kernel needs, checked and allocated by the same code on every backend: the
// contiguous inputs and the outputs (h only with a residual, mean only when asked for).
struct NormForward {
  at::Tensor x, residual;
  NormParams p;
  at::Tensor y, h, mean, rstd;
  int64_t rows, n;
};

inline NormForward norm_forward(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                double eps, bool with_mean) {
  check_norm_input(x, op);
  if (residual.has_value()) check_like_x(*residual, x, op, "residual");
  check_eps(eps, op);
  NormForward f;
  f.p = norm_params(weight, bias, x, op);
  f.x = x.contiguous();
  if (residual.has_value()) {
    f.residual = residual->contiguous();
    f.h = empty_rows_like(x);
  }
  f.y = empty_rows_like(x);
  if (with_mean) f.mean = empty_stats(x);
  f.rstd = empty_stats(x);
  f.rows = norm_rows(x);
  f.n = x.size(-1);
  return f;
}

// The same for a backward: contiguous grad_out (and grad_h, the gradient arriving at add_rms_norm's
// sum output), x, statistics; dx, and dw / db in the parameters' dtype where those exist. With no rows
// the parameter gradients are already zero and there is nothing to launch.
struct NormBackward {
  at::Tensor grad_out, grad_h, x, mean, rstd;
  NormParams p;
  at::Tensor dx;
  std::optional<at::Tensor> dw, db;
  int64_t rows, n;
};

inline NormBackward norm_backward(const char* op, const char* x_arg, const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& grad_h, const at::Tensor& x,
                                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& mean, const at::Tensor& rstd) {
  check_norm_input(x, op, x_arg);
  check_like_x(grad_out, x, op, "grad_out", x_arg);
  NormBackward b;
  if (grad_h.has_value() && grad_h->defined()) {
    check_like_x(*grad_h, x, op, "grad_h", x_arg);
    b.grad_h = grad_h->contiguous();
  }
  b.p = norm_params(weight, bias, x, op);
  if (mean.has_value()) {
    check_norm_stats(*mean, x, op, "mean");
    b.mean = mean->contiguous();
  }
  check_norm_stats(rstd, x, op, "rstd");
  b.grad_out = grad_out.contiguous();
  b.x = x.contiguous();
  b.rstd = rstd.contiguous();
  b.dx = empty_rows_like(x);
  if (b.p.w.defined()) b.dw = at::empty_like(b.p.w);
  if (b.p.b.defined()) b.db = at::empty_like(b.p.b);
  b.rows = norm_rows(x);
  b.n = x.size(-1);
  if (b.rows == 0) {
    if (b.dw) b.dw->zero_();
    if (b.db) b.db->zero_();
  }
  return b;
}

}  // namespace torchfast
