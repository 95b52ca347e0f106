// swish on CPU: argument checks, output allocation, and the call into the per-ISA kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <torchfast/checks.h>
#include <torchfast/cpu_isa.h>

TORCHFAST_DECLARE_CPU_KERNEL(void, swish_fwd, c10::ScalarType, const void*, void*, int64_t)
TORCHFAST_DECLARE_CPU_KERNEL(void, swish_bwd, c10::ScalarType, const void*, const void*, void*,
                             int64_t)

namespace torchfast {

at::Tensor swish_cpu(const at::Tensor& x) {
  check_strided(x, "swish", "x");
  check_float(x, "swish", "x");
  at::Tensor xd = dense_or_contiguous(x);
  // empty_like keeps the strides of a dense input, so channels-last in gives channels-last out.
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() > 0) {
    TORCHFAST_CPU_DISPATCH(swish_fwd)(xd.scalar_type(), xd.const_data_ptr(), y.mutable_data_ptr(),
                                      xd.numel());
  }
  return y;
}

at::Tensor swish_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  check_strided(grad_out, "swish_backward", "grad_out");
  check_strided(x, "swish_backward", "x");
  check_float(x, "swish_backward", "x");
  check_same_device(grad_out, x, "swish_backward", "grad_out", "x");
  check_same_dtype(grad_out, x, "swish_backward", "grad_out", "x");
  check_same_shape(grad_out, x, "swish_backward", "grad_out", "x");
  at::Tensor xd = dense_or_contiguous(x);
  at::Tensor gd = grad_out;
  // Both inputs are walked in the same linear order, so they need identical dense strides.
  if (!gd.is_non_overlapping_and_dense() || gd.strides() != xd.strides()) {
    xd = x.contiguous();
    gd = grad_out.contiguous();
  }
  at::Tensor grad_in = at::empty_like(xd);
  if (xd.numel() > 0) {
    TORCHFAST_CPU_DISPATCH(swish_bwd)(xd.scalar_type(), gd.const_data_ptr(), xd.const_data_ptr(),
                                      grad_in.mutable_data_ptr(), xd.numel());
  }
  return grad_in;
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("swish", &swish_cpu);
  m.impl("swish_backward", &swish_backward_cpu);
}

}  // namespace torchfast
