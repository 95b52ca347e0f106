// Autograd of swiglu / geglu (separate and packed), registered in C++ for the Autograd key of every
// backend: a Python autograd kernel costs several microseconds per call, more than the op on small
// inputs (see csrc/ops/swish/swish_autograd.cpp). torchfast/ops/glu.py registers the same rules in
// Python only when _C is not built.
//
// Forward saves only its inputs (gate and up, or the packed x): backward recomputes the activation.
// Backward runs the torchfast::*_backward ops, so compiled and exported backward graphs see the fused
// kernels; those have Python autograd (their double backward, torchfast/ops/glu.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    static auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>("torchfast::swiglu");
    ctx->save_for_backward({gate, up});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(gate, up);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op =
        find<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("torchfast::swiglu_backward");
    const auto saved = ctx->get_saved_variables();
    auto [dg, du] = op.call(grads[0], saved[0], saved[1]);
    return {dg, du};
  }
};

class SwigluPackedFunction : public torch::autograd::Function<SwigluPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    static auto op = find<at::Tensor(const at::Tensor&)>("torchfast::swiglu_packed");
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>("torchfast::swiglu_packed_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0])};
  }
};

class GegluFunction : public torch::autograd::Function<GegluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                            c10::string_view approximate) {
    static auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>("torchfast::geglu");
    ctx->saved_data["approximate"] = std::string(approximate);
    ctx->save_for_backward({gate, up});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(gate, up, approximate);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = find<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view)>(
        "torchfast::geglu_backward");
    const auto saved = ctx->get_saved_variables();
    auto [dg, du] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["approximate"].toStringRef());
    return {dg, du, at::Tensor()};
  }
};

class GegluPackedFunction : public torch::autograd::Function<GegluPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, c10::string_view approximate) {
    static auto op = find<at::Tensor(const at::Tensor&, c10::string_view)>("torchfast::geglu_packed");
    ctx->saved_data["approximate"] = std::string(approximate);
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, approximate);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view)>(
        "torchfast::geglu_packed_backward");
    return {op.call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["approximate"].toStringRef()),
            at::Tensor()};
  }
};

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) { return SwigluFunction::apply(gate, up); }
at::Tensor swiglu_packed_autograd(const at::Tensor& x) { return SwigluPackedFunction::apply(x); }
at::Tensor geglu_autograd(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
  return GegluFunction::apply(gate, up, approximate);
}
at::Tensor geglu_packed_autograd(const at::Tensor& x, c10::string_view approximate) {
  return GegluPackedFunction::apply(x, approximate);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("swiglu", &swiglu_autograd);
  m.impl("swiglu_packed", &swiglu_packed_autograd);
  m.impl("geglu", &geglu_autograd);
  m.impl("geglu_packed", &geglu_packed_autograd);
}

}  // namespace torchfast
