// Small helpers shared by the C++ autograd kernels (csrc/ops/*/*_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchfast {

// An undefined tensor (autograd's "no gradient") as an empty optional, for ops taking Tensor? arguments.
inline std::optional<at::Tensor> opt_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// a + b where either may be undefined (no gradient flowed there); undefined only if both are.
inline at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!b.defined()) return a;
  return a.defined() ? a + b : b;
}

}  // namespace torchfast
