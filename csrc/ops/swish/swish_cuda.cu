// swish / SiLU on CUDA: the same math, checks and output layout as swish_cpu.cpp / swish_kernel.cpp.
//
//   forward:  y  = x * sigmoid(x) = x / (1 + exp(-x))
//   backward: dx = dy * s * (1 + x * (1 - s)),  s = sigmoid(x)
//
// Written as x / (1 + exp(-x)) so the infinities come out as torch.nn.functional.silu's:
// swish(+inf) = inf / 1 = inf and swish(-inf) = -inf / inf = NaN. bf16/fp16 are computed in fp32
// and rounded once; double stays double (cuda_utils.cuh, map1/map2).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <torchfast/checks.h>
#include <torchfast/cuda_utils.cuh>

namespace torchfast {
namespace {

struct SwishFwd {
  template <typename C>
  __device__ __forceinline__ C operator()(C x) const {
    return x / (C(1) + cuda::exp_op(-x));
  }
};

struct SwishBwd {
  template <typename C>
  __device__ __forceinline__ C operator()(C g, C x) const {
    const C s = C(1) / (C(1) + cuda::exp_op(-x));
    return g * s * (C(1) + x * (C(1) - s));
  }
};

}  // namespace

at::Tensor swish_cuda(const at::Tensor& x) {
  check_elementwise_forward(x, "swish");
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);  // keeps a dense input's layout: channels-last stays so
  if (y.numel() > 0) {
    const at::Tensor xd = laid_out_like(x, y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "swish_cuda", [&] {
      cuda::map1(SwishFwd{}, y.mutable_data_ptr<scalar_t>(), xd.const_data_ptr<scalar_t>(),
                 y.numel());
    });
  }
  return y;
}

at::Tensor swish_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x) {
  check_elementwise_backward(grad_out, x, "swish_backward");
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_in = at::empty_like(x);
  if (grad_in.numel() > 0) {
    // A stride-0 grad_out (from .sum().backward()) or one of another layout is copied once.
    const at::Tensor xd = laid_out_like(x, grad_in);
    const at::Tensor gd = laid_out_like(grad_out, grad_in);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "swish_backward_cuda", [&] {
      cuda::map2(SwishBwd{}, grad_in.mutable_data_ptr<scalar_t>(), gd.const_data_ptr<scalar_t>(),
                 xd.const_data_ptr<scalar_t>(), grad_in.numel());
    });
  }
  return grad_in;
}

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("swish", &swish_cuda);
  m.impl("swish_backward", &swish_backward_cuda);
}

}  // namespace torchfast
