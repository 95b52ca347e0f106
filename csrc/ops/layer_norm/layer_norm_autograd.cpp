// Autograd of layer_norm, registered in C++ for the Autograd key of every backend (the per-call cost
// of a Python autograd kernel, see csrc/ops/rms_norm/rms_norm_autograd.cpp). torchfast/ops/layer_norm.py
// registers the same rule in Python only when _C is not built.
//
// Saves x, weight and bias (parameters; bias only for its presence and dtype), mean and rstd; backward
// runs torchfast::layer_norm_backward. mean and rstd are differentiable outputs: gradients reaching
// them (only from a double backward) add d mean / dx = 1 / n and d rstd / dx = -rstd^3 (x - mean) / n.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/pow.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torchfast/autograd_util.h>

#include <optional>
#include <tuple>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;
using Out3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads3 = std::tuple<at::Tensor, OptTensor, OptTensor>;

Out3 layer_norm_op(const at::Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::layer_norm", "")
                       .typed<Out3(const at::Tensor&, const OptTensor&, const OptTensor&, double)>();
  return op.call(x, w, b, eps);
}

Grads3 layer_norm_backward_op(const at::Tensor& g, const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                              const at::Tensor& mean, const at::Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::layer_norm_backward", "")
                       .typed<Grads3(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                     const at::Tensor&, const at::Tensor&)>();
  return op.call(g, x, w, b, mean, rstd);
}

class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                             const OptTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = layer_norm_op(x, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    at::Tensor dx, dw, db;
    if (grads[0].defined()) {
      auto [gx, gw, gb] = layer_norm_backward_op(grads[0], x, opt_defined(weight), opt_defined(bias), mean, rstd);
      dx = gx;
      if (gw) dw = *gw;
      if (gb) db = *gb;
    }
    const double inv_n = 1.0 / static_cast<double>(x.size(-1));
    if (grads[1].defined()) {
      dx = add_defined(dx, (grads[1] * inv_n).unsqueeze(-1).expand(x.sizes()).to(x.scalar_type()));
    }
    if (grads[2].defined()) {
      const at::Tensor centered = x.to(mean.scalar_type()) - mean.unsqueeze(-1);
      const at::Tensor coef = (grads[2] * rstd.pow(3) * -inv_n).unsqueeze(-1);
      dx = add_defined(dx, (coef * centered).to(x.scalar_type()));
    }
    return {dx, dw, db, at::Tensor()};
  }
};

Out3 layer_norm_autograd(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  auto out = LayerNormFunction::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) { m.impl("layer_norm", &layer_norm_autograd); }

}  // namespace torchfast
