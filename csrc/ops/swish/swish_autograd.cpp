// Autograd for swish, registered in C++ for the Autograd dispatch key of every backend.
//
// A Python autograd kernel (torch.library.register_autograd) costs about 7 us per call even under
// no_grad, and more in backward: for tensors of 2^16 elements that is more than the kernel itself.
// This C++ version does the same thing at the dispatcher's native cost. Forward saves only x;
// backward calls the torchfast::swish_backward op (so compiled and exported backward graphs see the
// fused kernel), and swish_backward has its own autograd, so double backward works too.
// torchfast/ops/swish.py registers the Python equivalent only when _C is not built.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/sigmoid.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor swish_op(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::swish", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor swish_backward_op(const at::Tensor& grad_out, const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::swish_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, x);
}

class SwishFunction : public torch::autograd::Function<SwishFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return swish_op(x);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {swish_backward_op(grads[0], saved[0])};
  }
};

// d/d(grad_out) = swish'(x), so that part is swish_backward again; d/dx = grad_out * swish''(x),
// swish''(x) = s (1 - s) (2 + x (1 - 2 s)) with s = sigmoid(x), in plain ATen ops (rarely used).
class SwishBackwardFunction : public torch::autograd::Function<SwishBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x) {
    ctx->save_for_backward({grad_out, x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return swish_backward_op(grad_out, x);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = saved[0];
    const at::Tensor& x = saved[1];
    const at::Tensor& gg = grads[0];
    const at::Tensor s = at::sigmoid(x);
    const at::Tensor d2 = s * (1 - s) * (2 + x * (1 - 2 * s));
    return {swish_backward_op(gg, x), gg * grad_out * d2};
  }
};

at::Tensor swish_autograd(const at::Tensor& x) { return SwishFunction::apply(x); }

at::Tensor swish_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x) {
  return SwishBackwardFunction::apply(grad_out, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("swish", &swish_autograd);
  m.impl("swish_backward", &swish_backward_autograd);
}

}  // namespace torchfast
