// Autograd of bias_act, registered in C++ for the Autograd key of every backend: a Python autograd
// kernel costs several microseconds per call, more than the op on small inputs (see
// csrc/ops/swish/swish_autograd.cpp). torchfast/ops/bias_act.py registers the same rule in Python only
// when _C is not built.
//
// Forward saves x and the bias (a parameter that lives anyway), not x + bias; backward runs the
// torchfast::bias_act_backward op, so compiled and exported backward graphs see the fused kernel. The
// backward op has Python autograd (its double backward, torchfast/ops/bias_act.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;

at::Tensor bias_act_op(const at::Tensor& x, const OptTensor& bias, c10::string_view act) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::bias_act", "")
                       .typed<at::Tensor(const at::Tensor&, const OptTensor&, c10::string_view)>();
  return op.call(x, bias, act);
}

std::tuple<at::Tensor, at::Tensor> bias_act_backward_op(const at::Tensor& g, const at::Tensor& x,
                                                        const OptTensor& bias, c10::string_view act) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchfast::bias_act_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                    c10::string_view)>();
  return op.call(g, x, bias, act);
}

class BiasActFunction : public torch::autograd::Function<BiasActFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& bias,
                            c10::string_view act) {
    ctx->saved_data["act"] = std::string(act);
    ctx->save_for_backward({x, bias.value_or(at::Tensor())});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return bias_act_op(x, bias, act);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &bias = saved[1];
    const std::string act = ctx->saved_data["act"].toStringRef();
    auto [dx, db] = bias_act_backward_op(grads[0], x, bias.defined() ? OptTensor(bias) : std::nullopt, act);
    return {dx, bias.defined() ? db : at::Tensor(), at::Tensor()};
  }
};

at::Tensor bias_act_autograd(const at::Tensor& x, const OptTensor& bias, c10::string_view act) {
  return BiasActFunction::apply(x, bias, act);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) { m.impl("bias_act", &bias_act_autograd); }

}  // namespace torchfast
