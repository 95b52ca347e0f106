// rms_norm and add_rms_norm on CPU: argument checks, output allocation, and the call into the
// per-ISA kernels (rms_norm_kernel.cpp).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include <torchfast/cpu_isa.h>
#include <torchfast/norm.h>

TORCHFAST_DECLARE_CPU_KERNEL(void, rms_norm_fwd, c10::ScalarType, c10::ScalarType, const void*, const void*,
                             const void*, void*, void*, void*, int64_t, int64_t, double)
TORCHFAST_DECLARE_CPU_KERNEL(void, rms_norm_bwd, c10::ScalarType, c10::ScalarType, const void*, const void*,
                             const void*, const void*, const void*, void*, void*, int64_t, int64_t)

namespace torchfast {
namespace {

// Shared backward of rms_norm and add_rms_norm: dx (plus grad_h when given) and, with a weight, dw.
std::tuple<at::Tensor, std::optional<at::Tensor>> backward(const char* op, const char* x_arg,
                                                           const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_h,
                                                           const at::Tensor& x,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& rstd) {
  NormBackward b = norm_backward(op, x_arg, grad_out, grad_h, x, weight, std::nullopt, std::nullopt, rstd);
  if (b.rows > 0) {
    TORCHFAST_CPU_DISPATCH(rms_norm_bwd)(x.scalar_type(), b.p.dtype, b.grad_out.const_data_ptr(),
                                         b.x.const_data_ptr(), ptr_or_null(b.p.w), b.rstd.const_data_ptr(),
                                         ptr_or_null(b.grad_h), b.dx.mutable_data_ptr(), mut_ptr_or_null(b.dw),
                                         b.rows, b.n);
  }
  return {b.dx, b.dw};
}

// Shared forward; h (the sum x + residual) only with a residual.
NormForward forward(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& weight, double eps) {
  NormForward f = norm_forward(op, x, residual, weight, std::nullopt, eps, /*with_mean=*/false);
  if (f.rows > 0) {
    TORCHFAST_CPU_DISPATCH(rms_norm_fwd)(x.scalar_type(), f.p.dtype, f.x.const_data_ptr(), ptr_or_null(f.residual),
                                         ptr_or_null(f.p.w), f.y.mutable_data_ptr(),
                                         f.h.defined() ? f.h.mutable_data_ptr() : nullptr,
                                         f.rstd.mutable_data_ptr(), f.rows, f.n, eps);
  }
  return f;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps) {
  NormForward f = forward("rms_norm", x, std::nullopt, weight, eps);
  return {f.y, f.rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& x,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        const at::Tensor& rstd) {
  return backward("rms_norm_backward", "x", grad_out, std::nullopt, x, weight, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                const std::optional<at::Tensor>& weight,
                                                                double eps) {
  NormForward f = forward("add_rms_norm", x, residual, weight, eps);
  return {f.y, f.h, f.rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> add_rms_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  return backward("add_rms_norm_backward", "h", grad_out, grad_h, h, weight, rstd);
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cpu);
}

}  // namespace torchfast
