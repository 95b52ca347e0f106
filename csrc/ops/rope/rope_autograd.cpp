// Autograd of rope, registered in C++ for the Autograd key of every backend (a Python autograd kernel
// costs several microseconds per call; see csrc/ops/swish/swish_autograd.cpp). torchfast/ops/rope.py
// registers the same rule in Python only when _C is not built.
//
// The gradients of q and k are the transposed rotation, the torchfast::rope_backward op (so compiled and
// exported backward graphs see the fused kernel); it needs only cos and sin, so that is all forward
// saves. The gradients of cos and sin (rarely wanted: RoPE's angles are constants) are sums over the
// broadcast dimensions of g * x and g * rotate(x) (torchfast/reference/rope.py), computed here with ATen
// ops, and only when cos or sin requires grad: then, and only then, q and k are saved too.
#include <ATen/ExpandUtils.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using RopeSig = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);

c10::TypedOperatorHandle<RopeSig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<RopeSig>();
}

at::Tensor rotate(const at::Tensor& x, bool interleaved) {
  if (interleaved) {
    return at::stack({-x.slice(-1, 1, c10::nullopt, 2), x.slice(-1, 0, c10::nullopt, 2)}, -1).flatten(-2);
  }
  auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// (grad_cos, grad_sin), as rope_cos_sin_grad_reference in torchfast/reference/rope.py.
Pair cos_sin_grads(const tensor_list& grads, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   int64_t unsqueeze_dim, bool interleaved) {
  const int64_t r = cos.size(-1);
  const auto shape = cos.unsqueeze(unsqueeze_dim).sizes().vec();
  const auto acc = at::promote_types(at::promote_types(q.scalar_type(), cos.scalar_type()), at::kFloat);
  at::Tensor gc = at::zeros(shape, cos.options().dtype(acc));
  at::Tensor gs = at::zeros(shape, cos.options().dtype(acc));
  const at::Tensor* xs[2] = {&q, &k};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor g = grads[i].narrow(-1, 0, r).to(acc);
    const at::Tensor x = xs[i]->narrow(-1, 0, r).to(acc);
    gc = gc + at::sum_to(g * x, shape);
    gs = gs + at::sum_to(g * rotate(x, interleaved), shape);
  }
  return {gc.squeeze(unsqueeze_dim).to(cos.scalar_type()), gs.squeeze(unsqueeze_dim).to(cos.scalar_type())};
}

class RopeFunction : public torch::autograd::Function<RopeFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t unsqueeze_dim, bool interleaved) {
    static auto op = find("torchfast::rope");
    const bool cs_grad = cos.requires_grad() || sin.requires_grad();
    ctx->saved_data["unsqueeze_dim"] = unsqueeze_dim;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["cs_grad"] = cs_grad;
    if (cs_grad) {
      ctx->save_for_backward({cos, sin, q, k});
    } else {
      ctx->save_for_backward({cos, sin});
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [a, b] = op.call(q, k, cos, sin, unsqueeze_dim, interleaved);
    return {a, b};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = find("torchfast::rope_backward");
    const auto saved = ctx->get_saved_variables();
    const int64_t unsqueeze_dim = ctx->saved_data["unsqueeze_dim"].toInt();
    const bool interleaved = ctx->saved_data["interleaved"].toBool();
    auto [dq, dk] = op.call(grads[0], grads[1], saved[0], saved[1], unsqueeze_dim, interleaved);
    at::Tensor dc, ds;
    if (ctx->saved_data["cs_grad"].toBool()) {
      std::tie(dc, ds) = cos_sin_grads(grads, saved[2], saved[3], saved[0], unsqueeze_dim, interleaved);
    }
    return {dq, dk, dc, ds, at::Tensor(), at::Tensor()};
  }
};

Pair rope_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                   int64_t unsqueeze_dim, bool interleaved) {
  auto out = RopeFunction::apply(q, k, cos, sin, unsqueeze_dim, interleaved);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) { m.impl("rope", &rope_autograd); }

}  // namespace torchfast
