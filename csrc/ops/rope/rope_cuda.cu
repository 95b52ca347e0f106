// Rotary embedding on CUDA: the same math, checks and layouts as on CPU (rope.h, rope_kernel.cpp).
//
//   rotate-half, pairs (x1, x2) = (x[j], x[j + R/2]); interleaved, pairs (x[2j], x[2j + 1]):
//     forward    o1 = x1 c1 - x2 s1      o2 = x2 c2 + x1 s2
//     transpose  o1 = x1 c1 + x2 s2      o2 = x2 c2 - x1 s1        (rope_backward)
//
// A block of 32 x 8 threads takes 8 rows at a time, 32 lanes per row walking its pairs (consecutive
// lanes read consecutive features in the rotate-half layout); each row's offsets in x, out and cos/sin
// come from its index through the leading dimensions' strides (cos/sin broadcast by stride 0). Math in
// at::opmath_type (float for bf16/fp16, rounded once on store); cos/sin may be float32 with bf16/fp16 x.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "rope.h"

namespace torchfast {
namespace {

constexpr int kLanes = 32;
constexpr int kRowsPerBlock = 8;

// Bounded by the block launch() uses, 32 x 8 = 256 threads (listed as such in scripts/check_device_code.py,
// which measured up to 80 registers per thread: fine for 256 threads, too many for 1024).
template <typename T, typename CS, bool kInterleaved, bool kTranspose>
__global__ void __launch_bounds__(kLanes * kRowsPerBlock) rope_kernel(rope::Operand o, const CS* __restrict__ cos, const CS* __restrict__ sin, int64_t rot) {
  using C = at::opmath_type<T>;
  const T* __restrict__ x = static_cast<const T*>(o.x);
  T* __restrict__ out = static_cast<T*>(o.out);
  const int64_t h = rot / 2;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; r < o.rows;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    int64_t rem = r, xo = 0, oo = 0, co = 0;
    for (int d = o.nd - 1; d >= 0; --d) {
      const int64_t i = rem % o.size[d];
      rem /= o.size[d];
      xo += i * o.x_stride[d];
      oo += i * o.out_stride[d];
      co += i * o.cs_stride[d];
    }
    const T* xr = x + xo;
    T* yr = out + oo;
    const CS* cr = cos + co;
    const CS* sr = sin + co;
    for (int64_t j = threadIdx.x; j < h; j += kLanes) {
      const int64_t p1 = kInterleaved ? 2 * j : j;
      const int64_t p2 = kInterleaved ? 2 * j + 1 : j + h;
      const C x1 = static_cast<C>(xr[p1]), x2 = static_cast<C>(xr[p2]);
      const C c1 = static_cast<C>(cr[p1]), c2 = static_cast<C>(cr[p2]);
      const C s1 = static_cast<C>(sr[p1]), s2 = static_cast<C>(sr[p2]);
      C o1, o2;
      if constexpr (kTranspose) {
        o1 = x1 * c1 + x2 * s2;
        o2 = x2 * c2 - x1 * s1;
      } else {
        o1 = x1 * c1 - x2 * s1;
        o2 = x2 * c2 + x1 * s2;
      }
      yr[p1] = static_cast<T>(o1);
      yr[p2] = static_cast<T>(o2);
    }
    for (int64_t j = rot + threadIdx.x; j < o.dim; j += kLanes) yr[j] = xr[j];  // partial rotary
  }
}

template <typename T, typename CS>
void launch(const rope::Params& p, cudaStream_t stream) {
  const dim3 block(kLanes, kRowsPerBlock);
  for (int i = 0; i < p.n_ops; ++i) {
    const rope::Operand& o = p.op[i];
    const int64_t blocks = std::min<int64_t>((o.rows + kRowsPerBlock - 1) / kRowsPerBlock, int64_t{1} << 20);
    const auto* c = static_cast<const CS*>(p.cos);
    const auto* s = static_cast<const CS*>(p.sin);
    if (p.interleaved) {
      if (p.transpose) {
        rope_kernel<T, CS, true, true><<<blocks, block, 0, stream>>>(o, c, s, p.rot);
      } else {
        rope_kernel<T, CS, true, false><<<blocks, block, 0, stream>>>(o, c, s, p.rot);
      }
    } else {
      if (p.transpose) {
        rope_kernel<T, CS, false, true><<<blocks, block, 0, stream>>>(o, c, s, p.rot);
      } else {
        rope_kernel<T, CS, false, false><<<blocks, block, 0, stream>>>(o, c, s, p.rot);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

struct Cuda {
  using Guard = c10::cuda::CUDAGuard;

  static void run(c10::ScalarType dtype, c10::ScalarType cs_dtype, const rope::Params& p) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rope_cuda", [&] {
      if (cs_dtype == dtype) {
        launch<scalar_t, scalar_t>(p, stream);
      } else {  // float32 cos/sin with bf16/fp16 x (rope.h refuses every other mix)
        launch<scalar_t, float>(p, stream);
      }
    });
  }
};

using Ops = rope::RopeOps<Cuda>;

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("rope", &Ops::rope);
  m.impl("rope_backward", &Ops::rope_backward);
}

}  // namespace torchfast
