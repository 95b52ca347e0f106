// Parsing of the activation names the Python API and the op schemas use (`act`, `approximate`).
// Host code only (op files), never the per-ISA kernel files.
#pragma once

#include <c10/util/Exception.h>
#include <torchfast/act_codes.h>

#include <string>

namespace torchfast {

// `name` as an activation code, or a ValueError naming the op, the argument and the allowed names.
inline ActCode parse_act(const std::string& name, const char* op, const char* arg) {
  if (name == "identity") return ActCode::Identity;
  if (name == "relu") return ActCode::Relu;
  if (name == "gelu") return ActCode::Gelu;
  if (name == "gelu_tanh") return ActCode::GeluTanh;
  if (name == "swish") return ActCode::Swish;
  TORCH_CHECK_VALUE(false, "torchfast.", op, ": unknown activation '", name, "' for argument '", arg,
                    "'; expected one of identity, relu, gelu, gelu_tanh, swish");
}

// geglu's `approximate` argument ("none" | "tanh", as in torch.nn.functional.gelu) as an act code.
inline ActCode parse_gelu_approximate(const std::string& name, const char* op) {
  if (name == "none") return ActCode::Gelu;
  if (name == "tanh") return ActCode::GeluTanh;
  TORCH_CHECK_VALUE(false, "torchfast.", op, ": argument 'approximate' must be 'none' or 'tanh', got '",
                    name, "'");
}

}  // namespace torchfast
