// layer_norm on CPU: argument checks, output allocation, and the call into the per-ISA kernels
// (layer_norm_kernel.cpp).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include <torchfast/cpu_isa.h>
#include <torchfast/norm.h>

TORCHFAST_DECLARE_CPU_KERNEL(void, layer_norm_fwd, c10::ScalarType, c10::ScalarType, const void*, const void*,
                             const void*, void*, void*, void*, int64_t, int64_t, double)
TORCHFAST_DECLARE_CPU_KERNEL(void, layer_norm_bwd, c10::ScalarType, c10::ScalarType, const void*, const void*,
                             const void*, const void*, const void*, void*, void*, void*, int64_t, int64_t)

namespace torchfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  NormForward f = norm_forward("layer_norm", x, std::nullopt, weight, bias, eps, /*with_mean=*/true);
  if (f.rows > 0) {
    TORCHFAST_CPU_DISPATCH(layer_norm_fwd)(x.scalar_type(), f.p.dtype, f.x.const_data_ptr(), ptr_or_null(f.p.w),
                                           ptr_or_null(f.p.b), f.y.mutable_data_ptr(), f.mean.mutable_data_ptr(),
                                           f.rstd.mutable_data_ptr(), f.rows, f.n, eps);
  }
  return {f.y, f.mean, f.rstd};
}

// `bias` is only looked at for whether it exists and its dtype: its gradient is sum(grad_out) over rows.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  NormBackward b = norm_backward("layer_norm_backward", "x", grad_out, std::nullopt, x, weight, bias, mean, rstd);
  if (b.rows > 0) {
    TORCHFAST_CPU_DISPATCH(layer_norm_bwd)(x.scalar_type(), b.p.dtype, b.grad_out.const_data_ptr(),
                                           b.x.const_data_ptr(), ptr_or_null(b.p.w), b.mean.const_data_ptr(),
                                           b.rstd.const_data_ptr(), b.dx.mutable_data_ptr(), mut_ptr_or_null(b.dw),
                                           mut_ptr_or_null(b.db), b.rows, b.n);
  }
  return {b.dx, b.dw, b.db};
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace torchfast
