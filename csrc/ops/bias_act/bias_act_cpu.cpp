// bias_act on CPU: the per-ISA kernels (bias_act_kernel.cpp) behind the shared op logic (bias_act.h).
#include <torch/library.h>

#include <torchfast/cpu_isa.h>

#include "bias_act.h"

TORCHFAST_DECLARE_CPU_KERNEL(void, bias_act_fwd, c10::ScalarType, int, int64_t, int64_t, torchfast::RowPtr,
                             const void*, torchfast::RowPtrMut)
TORCHFAST_DECLARE_CPU_KERNEL(void, bias_act_bwd, c10::ScalarType, int, int64_t, int64_t, torchfast::RowPtr,
                             torchfast::RowPtr, const void*, torchfast::RowPtrMut, void*)

namespace torchfast {
namespace {

struct BiasActCpu {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr x, const void* bias,
                  RowPtrMut y) {
    TORCHFAST_CPU_DISPATCH(bias_act_fwd)(dtype, act, rows, cols, x, bias, y);
  }
  static void bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr x,
                  const void* bias, RowPtrMut grad_in, void* grad_bias) {
    TORCHFAST_CPU_DISPATCH(bias_act_bwd)(dtype, act, rows, cols, grad_out, x, bias, grad_in, grad_bias);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("bias_act", &bias_act_op::bias_act<BiasActCpu>);
  m.impl("bias_act_backward", &bias_act_op::bias_act_backward<BiasActCpu>);
}

}  // namespace torchfast
