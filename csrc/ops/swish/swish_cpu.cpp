// swish on CPU: argument checks, output allocation, and the call into the per-ISA kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <torchfast/checks.h>
#include <torchfast/cpu_alloc.h>
#include <torchfast/cpu_isa.h>

TORCHFAST_DECLARE_CPU_KERNEL(void, swish_fwd, c10::ScalarType, const void*, void*, int64_t)
TORCHFAST_DECLARE_CPU_KERNEL(void, swish_bwd, c10::ScalarType, const void*, const void*, void*,
                             int64_t)

namespace torchfast {

at::Tensor swish_cpu(const at::Tensor& x) {
  check_elementwise_forward(x, "swish");
  // empty_like keeps a dense input's layout (channels-last stays so); a large output gets the
  // huge-page hint before its first write (cpu_alloc.h: page faults cost more than the math).
  at::Tensor y = hinted(at::empty_like(x));
  if (y.numel() > 0) {
    at::Tensor xd = laid_out_like(x, y);
    TORCHFAST_CPU_DISPATCH(swish_fwd)(x.scalar_type(), xd.const_data_ptr(), y.mutable_data_ptr(),
                                      y.numel());
  }
  return y;
}

at::Tensor swish_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  check_elementwise_backward(grad_out, x, "swish_backward");
  at::Tensor grad_in = hinted(at::empty_like(x));
  if (grad_in.numel() > 0) {
    // A stride-0 grad_out (from .sum().backward()) or one of another layout is copied once.
    at::Tensor xd = laid_out_like(x, grad_in);
    at::Tensor gd = laid_out_like(grad_out, grad_in);
    TORCHFAST_CPU_DISPATCH(swish_bwd)(x.scalar_type(), gd.const_data_ptr(), xd.const_data_ptr(),
                                      grad_in.mutable_data_ptr(), grad_in.numel());
  }
  return grad_in;
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("swish", &swish_cpu);
  m.impl("swish_backward", &swish_backward_cpu);
}

}  // namespace torchfast
