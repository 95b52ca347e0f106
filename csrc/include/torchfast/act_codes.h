// Activation codes shared by the op files (which parse the `act` / `approximate` string arguments, see
// act_names.h) and the per-ISA kernels (which switch on the code). Only the enum lives here: the
// kernel files are compiled once per ISA and must not share inline functions with other files.
#pragma once

namespace torchfast {

enum class ActCode : int { Identity = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Swish = 4 };

}  // namespace torchfast
