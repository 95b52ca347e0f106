// rms_norm and add_rms_norm on CPU: argument checks, output allocation, and the call into the
// per-ISA kernels (rms_norm_kernel.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
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

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor contiguous_weight(const std::optional<at::Tensor>& weight, const at::Tensor& x, const char* op) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  check_norm_param(*weight, x, op, "weight");
  return weight->contiguous();
}

c10::ScalarType weight_dtype(const at::Tensor& w, const at::Tensor& x) {
  return w.defined() ? w.scalar_type() : x.scalar_type();
}

// Shared backward: dx (plus grad_h when given) and, with a weight, dw in the weight's dtype.
std::tuple<at::Tensor, std::optional<at::Tensor>> backward(const char* op, const char* x_arg,
                                                           const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_h,
                                                           const at::Tensor& x,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& rstd) {
  check_norm_input(x, op, x_arg);
  check_like_x(grad_out, x, op, "grad_out", x_arg);
  at::Tensor gs;
  if (grad_h.has_value() && grad_h->defined()) {
    check_like_x(*grad_h, x, op, "grad_h", x_arg);
    gs = grad_h->contiguous();
  }
  at::Tensor w = contiguous_weight(weight, x, op);
  check_norm_stats(rstd, x, op, "rstd");
  at::Tensor dx = empty_rows_like(x);
  std::optional<at::Tensor> dw;
  if (w.defined()) dw = at::empty_like(w, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) {
    if (dw) dw->zero_();
    return {dx, dw};
  }
  at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), rc = rstd.contiguous();
  TORCHFAST_CPU_DISPATCH(rms_norm_bwd)(x.scalar_type(), weight_dtype(w, x), gc.const_data_ptr(), xc.const_data_ptr(),
                                       ptr_or_null(w), rc.const_data_ptr(), ptr_or_null(gs), dx.mutable_data_ptr(),
                                       dw ? dw->mutable_data_ptr() : nullptr, norm_rows(x), x.size(-1));
  return {dx, dw};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps) {
  check_norm_input(x, "rms_norm");
  check_eps(eps, "rms_norm");
  at::Tensor w = contiguous_weight(weight, x, "rms_norm");
  at::Tensor y = empty_rows_like(x);
  at::Tensor rstd = empty_stats(x);
  if (x.numel() > 0) {
    at::Tensor xc = x.contiguous();
    TORCHFAST_CPU_DISPATCH(rms_norm_fwd)(x.scalar_type(), weight_dtype(w, x), xc.const_data_ptr(), nullptr,
                                         ptr_or_null(w), y.mutable_data_ptr(), nullptr, rstd.mutable_data_ptr(),
                                         norm_rows(x), x.size(-1), eps);
  }
  return {y, rstd};
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
  check_norm_input(x, "add_rms_norm");
  check_like_x(residual, x, "add_rms_norm", "residual");
  check_eps(eps, "add_rms_norm");
  at::Tensor w = contiguous_weight(weight, x, "add_rms_norm");
  at::Tensor y = empty_rows_like(x);
  at::Tensor h = empty_rows_like(x);
  at::Tensor rstd = empty_stats(x);
  if (x.numel() > 0) {
    at::Tensor xc = x.contiguous(), rc = residual.contiguous();
    TORCHFAST_CPU_DISPATCH(rms_norm_fwd)(x.scalar_type(), weight_dtype(w, x), xc.const_data_ptr(),
                                         rc.const_data_ptr(), ptr_or_null(w), y.mutable_data_ptr(),
                                         h.mutable_data_ptr(), rstd.mutable_data_ptr(), norm_rows(x), x.size(-1),
                                         eps);
  }
  return {y, h, rstd};
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
