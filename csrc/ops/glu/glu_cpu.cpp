// swiglu / geglu on CPU: the per-ISA kernels (glu_kernel.cpp) behind the shared op logic (glu.h).
#include <torch/library.h>

#include <torchfast/cpu_isa.h>

#include "glu.h"

TORCHFAST_DECLARE_CPU_KERNEL(void, glu_fwd, c10::ScalarType, int, int64_t, int64_t, torchfast::RowPtr,
                             torchfast::RowPtr, torchfast::RowPtrMut)
TORCHFAST_DECLARE_CPU_KERNEL(void, glu_bwd, c10::ScalarType, int, int64_t, int64_t, torchfast::RowPtr,
                             torchfast::RowPtr, torchfast::RowPtr, torchfast::RowPtrMut, torchfast::RowPtrMut)

namespace torchfast {
namespace {

struct GluCpu {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr gate, RowPtr up,
                  RowPtrMut out) {
    TORCHFAST_CPU_DISPATCH(glu_fwd)(dtype, act, rows, cols, gate, up, out);
  }
  static void bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr gate,
                  RowPtr up, RowPtrMut grad_gate, RowPtrMut grad_up) {
    TORCHFAST_CPU_DISPATCH(glu_bwd)(dtype, act, rows, cols, grad_out, gate, up, grad_gate, grad_up);
  }
};

using GluCpuOps = glu::GluOps<GluCpu>;

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("swiglu", &GluCpuOps::swiglu);
  m.impl("swiglu_backward", &GluCpuOps::swiglu_backward);
  m.impl("swiglu_packed", &GluCpuOps::swiglu_packed);
  m.impl("swiglu_packed_backward", &GluCpuOps::swiglu_packed_backward);
  m.impl("geglu", &GluCpuOps::geglu);
  m.impl("geglu_backward", &GluCpuOps::geglu_backward);
  m.impl("geglu_packed", &GluCpuOps::geglu_packed);
  m.impl("geglu_packed_backward", &GluCpuOps::geglu_packed_backward);
}

}  // namespace torchfast
