// Autograd of rms_norm and add_rms_norm, registered in C++ for the Autograd key of every backend: a
// Python autograd kernel costs several microseconds per call, more than the op on small inputs (see
// csrc/ops/swish/swish_autograd.cpp). torchfast/ops/rms_norm.py registers the same rules in Python
// only when _C is not built.
//
// rms_norm saves x, the weight (a parameter) and rstd; add_rms_norm saves h instead of x and
// residual. Backward runs the torchfast::rms_norm_backward / add_rms_norm_backward ops, so compiled
// and exported backward graphs see the fused kernels. rstd is a differentiable output: a gradient
// reaching it (only from a double backward) adds d rstd / dx = -rstd^3 x / n. The backward ops have
// Python autograd (their double backward), see torchfast/ops/_norm.py.
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

std::tuple<at::Tensor, at::Tensor> rms_norm_op(const at::Tensor& x, const OptTensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::rms_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, double)>();
  return op.call(x, w, eps);
}

std::tuple<at::Tensor, OptTensor> rms_norm_backward_op(const at::Tensor& g, const at::Tensor& x, const OptTensor& w,
                                                       const at::Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::rms_norm_backward", "")
                       .typed<std::tuple<at::Tensor, OptTensor>(const at::Tensor&, const at::Tensor&,
                                                                const OptTensor&, const at::Tensor&)>();
  return op.call(g, x, w, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x, const at::Tensor& r,
                                                               const OptTensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::add_rms_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const OptTensor&, double)>();
  return op.call(x, r, w, eps);
}

std::tuple<at::Tensor, OptTensor> add_rms_norm_backward_op(const at::Tensor& g, const OptTensor& gh,
                                                           const at::Tensor& h, const OptTensor& w,
                                                           const at::Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::add_rms_norm_backward", "")
                       .typed<std::tuple<at::Tensor, OptTensor>(const at::Tensor&, const OptTensor&,
                                                                const at::Tensor&, const OptTensor&,
                                                                const at::Tensor&)>();
  return op.call(g, gh, h, w, rstd);
}

// dL/dx from a gradient reaching rstd = (mean(x^2) + eps)^(-1/2): -grad_rstd * rstd^3 * x / n.
at::Tensor rstd_grad_term(const at::Tensor& grad_rstd, const at::Tensor& rstd, const at::Tensor& x) {
  const at::Tensor coef = (grad_rstd * rstd.pow(3) * (-1.0 / static_cast<double>(x.size(-1)))).unsqueeze(-1);
  return (coef * x.to(coef.scalar_type())).to(x.scalar_type());
}

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, rstd] = rms_norm_op(x, weight, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), rstd});
    ctx->set_materialize_grads(false);
    return {y, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &rstd = saved[2];
    at::Tensor dx, dw;
    if (grads[0].defined()) {
      auto [gx, gw] = rms_norm_backward_op(grads[0], x, opt_defined(weight), rstd);
      dx = gx;
      if (gw) dw = *gw;
    }
    if (grads[1].defined()) dx = add_defined(dx, rstd_grad_term(grads[1], rstd, x));
    return {dx, dw, at::Tensor()};
  }
};

class AddRMSNormFunction : public torch::autograd::Function<AddRMSNormFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                             const OptTensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h, rstd] = add_rms_norm_op(x, residual, weight, eps);
    ctx->save_for_backward({h, weight.value_or(at::Tensor()), rstd});
    ctx->set_materialize_grads(false);
    return {y, h, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &weight = saved[1], &rstd = saved[2];
    at::Tensor dh = grads[1], dw;
    if (grads[0].defined()) {
      auto [gh, gw] = add_rms_norm_backward_op(grads[0], opt_defined(grads[1]), h, opt_defined(weight), rstd);
      dh = gh;
      if (gw) dw = *gw;
    }
    if (grads[2].defined()) dh = add_defined(dh, rstd_grad_term(grads[2], rstd, h));
    // h = x + residual: both get dh, the same tensor, as torch's own add gives them.
    return {dh, dh, dw, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_autograd(const at::Tensor& x, const OptTensor& weight, double eps) {
  auto out = RMSNormFunction::apply(x, weight, eps);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_autograd(const at::Tensor& x, const at::Tensor& residual,
                                                                     const OptTensor& weight, double eps) {
  auto out = AddRMSNormFunction::apply(x, residual, weight, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("add_rms_norm", &add_rms_norm_autograd);
}

}  // namespace torchfast
