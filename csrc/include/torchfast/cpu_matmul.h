// Which library runs torchfast's own float32 CPU GEMMs (those issued from C++, such as the chunk GEMMs of
// linear_cross_entropy): oneDNN or ATen's BLAS (MKL). The choice is made in Python, by
// torchfast.ops.linear.cpu_matmul_backend() (TORCHFAST_CPU_MATMUL and the CPU vendor), and pushed here
// when torchfast is imported, so the C++ kernels and torchfast.linear agree without reading the
// environment on every call.
#pragma once

namespace torchfast::cpu {

void set_onednn_matmul(bool on);
bool onednn_matmul();

}  // namespace torchfast::cpu
