// Autograd of cross_entropy and linear_cross_entropy, registered in C++ for the Autograd key of every
// backend (as for the other ops: see csrc/ops/swish/swish_autograd.cpp). torchfast/ops/cross_entropy.py
// registers the same rules in Python only when _C is not built.
//
// cross_entropy saves the logits (the caller's tensor: no new memory), the target and the per-row lse;
// its backward runs the torchfast::cross_entropy_backward op, which recomputes softmax from them.
//
// linear_cross_entropy: for reduction "mean"/"sum" the forward op already computed the gradients (the
// grad_mask the caller passed, see the op's schema comment); backward multiplies them, in place, by the
// incoming scalar gradient (the op's gradient outputs are consumed by its backward). Otherwise (reduction
// "none", a gradient the forward did not compute, or a backward
// that builds a graph for a double backward) it runs torchfast::linear_cross_entropy_backward, which
// recomputes the logits chunk by chunk and whose own (Python) autograd gives the double backward.
//
// The lse outputs are differentiable: a gradient reaching them (never from the public functions, which
// do not return lse) adds grad_lse * softmax(s) * softcap'(x) to the logits' gradient.
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/TensorOperators.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/tanh.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torchfast/autograd_util.h>

#include "cross_entropy.h"

#include <array>
#include <optional>
#include <tuple>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;
using OptDouble = std::optional<double>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor2 ce_op(const at::Tensor& x, const at::Tensor& t, int64_t ii, double ls, double z, OptDouble cap) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::cross_entropy", "")
                       .typed<Tensor2(const at::Tensor&, const at::Tensor&, int64_t, double, double, OptDouble)>();
  return op.call(x, t, ii, ls, z, cap);
}

at::Tensor ce_backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& lse,
                          int64_t ii, double ls, double z, OptDouble cap) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::cross_entropy_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, double, double, OptDouble)>();
  return op.call(g, x, t, lse, ii, ls, z, cap);
}

Tensor5 lce_op(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t, const OptTensor& b, int64_t ii,
               c10::string_view red, double ls, double z, OptDouble cap, int64_t chunk, int64_t mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::linear_cross_entropy", "")
                       .typed<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                      int64_t, c10::string_view, double, double, OptDouble, int64_t,
                                      int64_t)>();
  return op.call(h, w, t, b, ii, red, ls, z, cap, chunk, mask);
}

Tensor3 lce_backward_op(const at::Tensor& g, const at::Tensor& h, const at::Tensor& w, const at::Tensor& t,
                        const OptTensor& b, const at::Tensor& lse, int64_t ii, double ls, double z, OptDouble cap,
                        int64_t chunk, int64_t mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchfast::linear_cross_entropy_backward", "")
                       .typed<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const OptTensor&, const at::Tensor&, int64_t, double, double, OptDouble,
                                      int64_t, int64_t)>();
  return op.call(g, h, w, t, b, lse, ii, ls, z, cap, chunk, mask);
}

OptDouble opt_cap(double cap) { return cap > 0 ? OptDouble(cap) : std::nullopt; }

// d sum(grad_lse * lse) / d logits = grad_lse * softmax(s) * softcap'(x), in logits' dtype.
at::Tensor lse_grad_term(const at::Tensor& grad_lse, const at::Tensor& logits, const at::Tensor& lse, double cap) {
  const at::Tensor x = logits.to(lse.scalar_type());
  const at::Tensor s = cap > 0 ? at::tanh(x / cap) * cap : x;
  at::Tensor d = at::exp(s - lse.unsqueeze(-1)) * grad_lse.unsqueeze(-1);
  if (cap > 0) d = d * (1 - (s / cap) * (s / cap));
  return d.to(logits.scalar_type());
}

void save_options(AutogradContext* ctx, int64_t ii, double ls, double z, const OptDouble& cap) {
  ctx->saved_data["ignore_index"] = ii;
  ctx->saved_data["label_smoothing"] = ls;
  ctx->saved_data["z_loss"] = z;
  ctx->saved_data["softcap"] = cap.value_or(0.0);
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target, int64_t ii,
                             double ls, double z, OptDouble cap) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse] = ce_op(logits, target, ii, ls, z, cap);
    ctx->save_for_backward({logits, target, lse});
    save_options(ctx, ii, ls, z, cap);
    ctx->set_materialize_grads(false);
    return {loss, lse};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &lse = saved[2];
    const int64_t ii = ctx->saved_data["ignore_index"].toInt();
    const double ls = ctx->saved_data["label_smoothing"].toDouble(), z = ctx->saved_data["z_loss"].toDouble();
    const double cap = ctx->saved_data["softcap"].toDouble();
    at::Tensor dx;
    if (grads[0].defined()) dx = ce_backward_op(grads[0], logits, target, lse, ii, ls, z, opt_cap(cap));
    if (grads[1].defined()) dx = add_defined(dx, lse_grad_term(grads[1], logits, lse, cap));
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                             const at::Tensor& target, const OptTensor& bias, int64_t ii, c10::string_view reduction,
                             double ls, double z, OptDouble cap, int64_t chunk, int64_t mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, lse, dh, dw, db] = lce_op(hidden, weight, target, bias, ii, reduction, ls, z, cap, chunk, mask);
    ctx->save_for_backward({hidden, weight, target, bias.value_or(at::Tensor()), lse});
    // The forward's gradients are kept outside the saved variables: backward scales them in place and
    // hands them on, so the step holds one copy of each, not two. A second backward through the same
    // graph (retain_graph) finds them gone and recomputes.
    ctx->saved_data["grads"] = c10::List<at::Tensor>({dh, dw, db});
    save_options(ctx, ii, ls, z, cap);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["chunk_size"] = chunk;
    ctx->saved_data["mask"] = mask;
    ctx->mark_non_differentiable({dh, dw, db});
    ctx->set_materialize_grads(false);
    return {loss, lse, dh, dw, db};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &target = saved[2], &bias = saved[3], &lse = saved[4];
    const int64_t ii = ctx->saved_data["ignore_index"].toInt();
    const double ls = ctx->saved_data["label_smoothing"].toDouble(), z = ctx->saved_data["z_loss"].toDouble();
    const double cap = ctx->saved_data["softcap"].toDouble();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const int64_t chunk = ctx->saved_data["chunk_size"].toInt();
    const std::array<bool, 3> done = grad_mask_bits(ctx->saved_data["mask"].toInt(), "linear_cross_entropy");
    const std::array<bool, 3> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(3)};
    c10::List<at::Tensor> pre = ctx->saved_data["grads"].toTensorList();
    ctx->saved_data["grads"] = c10::List<at::Tensor>();  // released with this backward, whichever path runs
    std::array<at::Tensor, 3> out;
    const at::Tensor& g = grads[0];
    if (g.defined()) {
      // The forward's gradients serve when it computed every one needed and no graph is being built.
      bool precomputed = reduction != "none" && !at::GradMode::is_enabled() && pre.size() == 3;
      for (int i = 0; i < 3; ++i) precomputed = precomputed && (!need[i] || done[i]);
      if (precomputed) {
        for (int i = 0; i < 3; ++i) {
          if (!need[i]) continue;
          at::Tensor p = pre.get(i);
          // In place on real tensors; traced graphs (fake or functional tensors under torch.compile) get
          // the out-of-place product, whose buffer the compiler's memory planning reuses.
          const bool traced = at::isTensorSubclassLike(p) || at::isTensorSubclassLike(g) ||
                              at::functionalization::impl::isFunctionalTensor(p) ||
                              at::functionalization::impl::isFunctionalTensor(g);
          out[i] = traced ? p * g : p.mul_(g);
        }
      } else {
        at::Tensor rows = g;
        if (reduction == "mean") rows = g / at::ne(target, ii).sum();
        if (reduction != "none") rows = rows.expand(target.sizes());
        auto [dh, dw, db] = lce_backward_op(rows, hidden, weight, target, opt_defined(bias), lse, ii, ls, z,
                                            opt_cap(cap), chunk, grad_mask_int(need));
        out = {dh, dw, db};
      }
    }
    if (grads[1].defined()) {  // only when a caller differentiates the lse output: builds the logits once
      const at::Tensor logits = at::linear(hidden, weight, opt_defined(bias));
      const at::Tensor d = lse_grad_term(grads[1], logits, lse, cap);
      const at::Tensor d2 = d.reshape({-1, d.size(-1)});
      if (need[0]) out[0] = add_defined(out[0], at::mm(d2, weight).reshape(hidden.sizes()));
      if (need[1]) out[1] = add_defined(out[1], at::mm(d2.t(), hidden.reshape({-1, hidden.size(-1)})));
      if (need[2]) out[2] = add_defined(out[2], d2.sum(0));
    }
    for (int i = 0; i < 3; ++i) {
      if (!need[i]) out[i] = at::Tensor();
    }
    return {out[0], out[1], at::Tensor(), out[2], at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensor2 cross_entropy_autograd(const at::Tensor& logits, const at::Tensor& target, int64_t ii, double ls, double z,
                               OptDouble cap) {
  auto out = CrossEntropyFunction::apply(logits, target, ii, ls, z, cap);
  return {out[0], out[1]};
}

Tensor5 linear_cross_entropy_autograd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                      const OptTensor& bias, int64_t ii, c10::string_view reduction, double ls,
                                      double z, OptDouble cap, int64_t chunk, int64_t mask) {
  auto out = LinearCrossEntropyFunction::apply(hidden, weight, target, bias, ii, reduction, ls, z, cap, chunk, mask);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
}

}  // namespace torchfast
