// bias_act: argument checks, output allocation and layout, shared by the CPU and CUDA op files. B (a
// backend) provides
//   static void fwd(ScalarType, int act, int64_t rows, int64_t cols, RowPtr x, const void* bias, RowPtrMut y);
//   static void bwd(ScalarType, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr x,
//                   const void* bias, RowPtrMut grad_in, void* grad_bias);
// (bias and grad_bias in the compute type, float or double, or null; grad_bias is overwritten), run on
// rows * cols > 0 elements, and a device guard type B::Guard(c10::Device). Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <torchfast/act_names.h>
#include <torchfast/checks.h>
#include <torchfast/cpu_alloc.h>
#include <torchfast/rows.h>

#include <optional>
#include <string>
#include <tuple>

namespace torchfast::bias_act_op {

// The type the kernels compute in: double for float64, float otherwise.
inline c10::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_bias(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  check_strided(bias, op, "bias");
  check_float(bias, op, "bias");
  check_same_device(bias, x, op, "bias", "x");
  check_same_dtype(bias, x, op, "bias", "x");
  TORCH_CHECK(x.dim() >= 1, "torchfast.", op, ": 'x' is 0-dimensional, but a bias is added along its last ",
              "dimension; pass bias=None or give x at least one dimension");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "torchfast.", op, ": argument 'bias' has shape ",
              bias.sizes(), " but x's last dimension is ", x.size(-1), "; bias must be 1-D with x.size(-1) ",
              "elements");
}

// The bias widened to the compute type, contiguous: one row, converted once per call.
inline at::Tensor bias_compute(const at::Tensor& bias) {
  return bias.to(compute_type(bias)).contiguous();
}

// Without a bias the op is elementwise: the output keeps x's dense layout (the swish rule, see
// checks.h). With a bias the output is contiguous, and x is read in place when it is a row view.
template <typename B>
at::Tensor bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view act) {
  constexpr const char* op = "bias_act";
  check_strided(x, op, "x");
  check_float(x, op, "x");
  const int code = static_cast<int>(parse_act(std::string(act), op, "act"));
  const typename B::Guard guard(x.device());
  if (!bias.has_value()) {
    at::Tensor y = hinted(at::empty_like(x));
    if (y.numel() > 0) {
      at::Tensor xd = laid_out_like(x, y);
      B::fwd(x.scalar_type(), code, 1, y.numel(), RowPtr{xd.const_data_ptr(), 0}, nullptr,
             RowPtrMut{y.mutable_data_ptr(), 0});
    }
    return y;
  }
  check_bias(x, *bias, op);
  at::Tensor y = hinted(at::empty(x.sizes(), x.options()));
  if (y.numel() > 0) {
    auto [xk, xr] = as_rows(x);
    at::Tensor b = bias_compute(*bias);
    B::fwd(x.scalar_type(), code, num_rows(x), x.size(-1), xr, b.const_data_ptr(),
           RowPtrMut{y.mutable_data_ptr(), x.size(-1)});
  }
  return y;
}

// Returns (grad_x, grad_bias); grad_bias has bias's shape and dtype, or shape [0] when bias is None.
template <typename B>
std::tuple<at::Tensor, at::Tensor> bias_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias, c10::string_view act) {
  constexpr const char* op = "bias_act_backward";
  check_strided(grad_out, op, "grad_out");
  check_strided(x, op, "x");
  check_float(x, op, "x");
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  check_same_shape(grad_out, x, op, "grad_out", "x");
  const int code = static_cast<int>(parse_act(std::string(act), op, "act"));
  const typename B::Guard guard(x.device());
  if (!bias.has_value()) {
    at::Tensor grad_in = hinted(at::empty_like(x));
    if (grad_in.numel() > 0) {
      // A stride-0 grad_out (from .sum().backward()) or one of another layout is copied once.
      at::Tensor xd = laid_out_like(x, grad_in);
      at::Tensor gd = laid_out_like(grad_out, grad_in);
      B::bwd(x.scalar_type(), code, 1, grad_in.numel(), RowPtr{gd.const_data_ptr(), 0},
             RowPtr{xd.const_data_ptr(), 0}, nullptr, RowPtrMut{grad_in.mutable_data_ptr(), 0}, nullptr);
    }
    return {grad_in, at::empty({0}, x.options())};
  }
  check_bias(x, *bias, op);
  at::Tensor grad_in = hinted(at::empty(x.sizes(), x.options()));
  at::Tensor grad_bias = at::empty({x.size(-1)}, x.options().dtype(compute_type(x)));
  if (x.numel() == 0) {
    grad_bias.zero_();
  } else {
    auto [gk, gr] = as_rows(grad_out);
    auto [xk, xr] = as_rows(x);
    at::Tensor b = bias_compute(*bias);
    B::bwd(x.scalar_type(), code, num_rows(x), x.size(-1), gr, xr, b.const_data_ptr(),
           RowPtrMut{grad_in.mutable_data_ptr(), x.size(-1)}, grad_bias.mutable_data_ptr());
  }
  return {grad_in, grad_bias.to(bias->scalar_type())};
}

}  // namespace torchfast::bias_act_op
