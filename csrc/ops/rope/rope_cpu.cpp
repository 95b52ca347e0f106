// rope on CPU: the per-ISA kernel (rope_kernel.cpp) behind the shared op logic (rope.h).
#include <torch/library.h>

#include <torchfast/cpu_isa.h>

#include "rope.h"

TORCHFAST_DECLARE_CPU_KERNEL(void, rope_kernel, c10::ScalarType, c10::ScalarType, const torchfast::rope::Params&)

namespace torchfast {
namespace {

struct Cpu {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void run(c10::ScalarType dtype, c10::ScalarType cs_dtype, const rope::Params& p) {
    TORCHFAST_CPU_DISPATCH(rope_kernel)(dtype, cs_dtype, p);
  }
};

using Ops = rope::RopeOps<Cpu>;

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("rope", &Ops::rope);
  m.impl("rope_backward", &Ops::rope_backward);
}

}  // namespace torchfast
