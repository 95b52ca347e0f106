// rope on CPU: the per-ISA kernel (rope_kernel.cpp) behind the shared op logic (rope.h).
#include <torch/library.h>

#include <torchfast/cpu_isa.h>

#include "rope.h"

TORCHFAST_DECLARE_CPU_KERNEL(void, rope_kernel, c10::ScalarType, c10::ScalarType, const torchfast::rope::Params&)

namespace torchfast {
namespace {

struct RopeCpu {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void run(c10::ScalarType dtype, c10::ScalarType cs_dtype, const rope::Params& p) {
    TORCHFAST_CPU_DISPATCH(rope_kernel)(dtype, cs_dtype, p);
  }
};

using RopeCpuOps = rope::RopeOps<RopeCpu>;

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("rope", &RopeCpuOps::rope);
  m.impl("rope_backward", &RopeCpuOps::rope_backward);
}

}  // namespace torchfast
