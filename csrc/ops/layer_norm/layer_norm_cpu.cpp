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
namespace {

struct Params {
  at::Tensor w, b;  // contiguous, or undefined
  c10::ScalarType dtype;
};

// weight and bias follow the same rule (x's dtype, or fp32 for bf16/fp16 x) and, together, one dtype:
// the kernel reads both as the same type.
Params affine_params(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& x, const char* op) {
  Params p{at::Tensor(), at::Tensor(), x.scalar_type()};
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

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input(x, "layer_norm");
  check_eps(eps, "layer_norm");
  Params p = affine_params(weight, bias, x, "layer_norm");
  at::Tensor y = empty_rows_like(x);
  at::Tensor mean = empty_stats(x);
  at::Tensor rstd = empty_stats(x);
  if (x.numel() > 0) {
    at::Tensor xc = x.contiguous();
    TORCHFAST_CPU_DISPATCH(layer_norm_fwd)(x.scalar_type(), p.dtype, xc.const_data_ptr(), ptr_or_null(p.w),
                                           ptr_or_null(p.b), y.mutable_data_ptr(), mean.mutable_data_ptr(),
                                           rstd.mutable_data_ptr(), norm_rows(x), x.size(-1), eps);
  }
  return {y, mean, rstd};
}

// `bias` is only looked at for whether it exists and its dtype: its gradient is sum(grad_out) over rows.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "layer_norm_backward";
  check_norm_input(x, op);
  check_like_x(grad_out, x, op, "grad_out");
  Params p = affine_params(weight, bias, x, op);
  check_norm_stats(mean, x, op, "mean");
  check_norm_stats(rstd, x, op, "rstd");
  at::Tensor dx = empty_rows_like(x);
  std::optional<at::Tensor> dw, db;
  if (p.w.defined()) dw = at::empty_like(p.w);
  if (p.b.defined()) db = at::empty_like(p.b);
  if (x.numel() == 0) {
    if (dw) dw->zero_();
    if (db) db->zero_();
    return {dx, dw, db};
  }
  at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), mc = mean.contiguous(), rc = rstd.contiguous();
  TORCHFAST_CPU_DISPATCH(layer_norm_bwd)(x.scalar_type(), p.dtype, gc.const_data_ptr(), xc.const_data_ptr(),
                                         ptr_or_null(p.w), mc.const_data_ptr(), rc.const_data_ptr(),
                                         dx.mutable_data_ptr(), dw ? dw->mutable_data_ptr() : nullptr,
                                         db ? db->mutable_data_ptr() : nullptr, norm_rows(x), x.size(-1));
  return {dx, dw, db};
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("layer_norm", &layer_norm_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace torchfast
