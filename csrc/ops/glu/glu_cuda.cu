// swiglu / geglu on CUDA (separate and packed): the same math, checks and layouts as on CPU (glu.h,
// glu_kernel.cpp).
//
//   forward:  y = act(gate) * up
//   backward: d_gate = dy * up * act'(gate),   d_up = dy * act(gate)
//
// Row-wise maps over row views (row_ptr.h), so the halves of a packed [..., 2H] tensor are read and
// written in place; 16 bytes per access when every row start is 16-byte aligned.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <torchfast/act_cuda.cuh>

#include "glu.h"

namespace torchfast {
namespace {

using act_cuda::Vec;

template <int N, typename I, typename T, typename A>
__global__ void glu_fwd_kernel(I rows, I cols, const T* __restrict__ gate, int64_t g_rs, const T* __restrict__ up,
                               int64_t u_rs, T* __restrict__ out, int64_t o_rs) {
  using C = at::opmath_type<T>;
  const I n_vec = rows * cols / N;
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < n_vec; v += gridDim.x * blockDim.x) {
    const I i = v * N, r = i / cols, c = i - r * cols;
    const Vec<T, N> g = *reinterpret_cast<const Vec<T, N>*>(gate + r * g_rs + c);
    const Vec<T, N> u = *reinterpret_cast<const Vec<T, N>*>(up + r * u_rs + c);
    Vec<T, N> y;
#pragma unroll
    for (int k = 0; k < N; ++k) y.v[k] = static_cast<T>(A::fwd(static_cast<C>(g.v[k])) * static_cast<C>(u.v[k]));
    *reinterpret_cast<Vec<T, N>*>(out + r * o_rs + c) = y;
  }
}

template <int N, typename I, typename T, typename A>
__global__ void glu_bwd_kernel(I rows, I cols, const T* __restrict__ grad_out, int64_t go_rs,
                               const T* __restrict__ gate, int64_t g_rs, const T* __restrict__ up, int64_t u_rs,
                               T* __restrict__ grad_gate, int64_t dg_rs, T* __restrict__ grad_up, int64_t du_rs) {
  using C = at::opmath_type<T>;
  const I n_vec = rows * cols / N;
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < n_vec; v += gridDim.x * blockDim.x) {
    const I i = v * N, r = i / cols, c = i - r * cols;
    const Vec<T, N> dy = *reinterpret_cast<const Vec<T, N>*>(grad_out + r * go_rs + c);
    const Vec<T, N> g = *reinterpret_cast<const Vec<T, N>*>(gate + r * g_rs + c);
    const Vec<T, N> u = *reinterpret_cast<const Vec<T, N>*>(up + r * u_rs + c);
    Vec<T, N> dg, du;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      C y, d;
      A::fwd_deriv(static_cast<C>(g.v[k]), y, d);
      const C dyk = static_cast<C>(dy.v[k]);
      du.v[k] = static_cast<T>(dyk * y);
      dg.v[k] = static_cast<T>(dyk * static_cast<C>(u.v[k]) * d);
    }
    *reinterpret_cast<Vec<T, N>*>(grad_gate + r * dg_rs + c) = dg;
    *reinterpret_cast<Vec<T, N>*>(grad_up + r * du_rs + c) = du;
  }
}

struct Cuda {
  using Guard = c10::cuda::CUDAGuard;

  static void fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr gate, RowPtr up,
                  RowPtrMut out) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "glu_cuda", [&] {
      act_cuda::dispatch_act<true>(act, [&](auto a) {
        using A = decltype(a);
        const auto* gp = static_cast<const scalar_t*>(gate.ptr);
        const auto* up_ = static_cast<const scalar_t*>(up.ptr);
        auto* op = static_cast<scalar_t*>(out.ptr);
        act_cuda::launch_rows<scalar_t>(rows, cols, {gp, up_, op}, {gate.row_stride, up.row_stride, out.row_stride},
                              [&](auto n, auto idx, dim3 grid, int64_t c0, int64_t len) {
          glu_fwd_kernel<decltype(n)::value, decltype(idx), scalar_t, A><<<grid, act_cuda::kThreads, 0, stream>>>(
              rows, len, gp + c0, gate.row_stride, up_ + c0, up.row_stride, op + c0, out.row_stride);
        });
      });
    });
  }

  static void bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr gate,
                  RowPtr up, RowPtrMut grad_gate, RowPtrMut grad_up) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "glu_backward_cuda", [&] {
      act_cuda::dispatch_act<true>(act, [&](auto a) {
        using A = decltype(a);
        const auto* dyp = static_cast<const scalar_t*>(grad_out.ptr);
        const auto* gp = static_cast<const scalar_t*>(gate.ptr);
        const auto* up_ = static_cast<const scalar_t*>(up.ptr);
        auto* dgp = static_cast<scalar_t*>(grad_gate.ptr);
        auto* dup = static_cast<scalar_t*>(grad_up.ptr);
        act_cuda::launch_rows<scalar_t>(
            rows, cols, {dyp, gp, up_, dgp, dup},
            {grad_out.row_stride, gate.row_stride, up.row_stride, grad_gate.row_stride, grad_up.row_stride},
            [&](auto n, auto idx, dim3 grid, int64_t c0, int64_t len) {
              glu_bwd_kernel<decltype(n)::value, decltype(idx), scalar_t, A><<<grid, act_cuda::kThreads, 0, stream>>>(
                  rows, len, dyp + c0, grad_out.row_stride, gp + c0, gate.row_stride, up_ + c0, up.row_stride,
                  dgp + c0, grad_gate.row_stride, dup + c0, grad_up.row_stride);
            });
      });
    });
  }
};

using Ops = glu::GluOps<Cuda>;

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("swiglu", &Ops::swiglu);
  m.impl("swiglu_backward", &Ops::swiglu_backward);
  m.impl("swiglu_packed", &Ops::swiglu_packed);
  m.impl("swiglu_packed_backward", &Ops::swiglu_packed_backward);
  m.impl("geglu", &Ops::geglu);
  m.impl("geglu_backward", &Ops::geglu_backward);
  m.impl("geglu_packed", &Ops::geglu_packed);
  m.impl("geglu_packed_backward", &Ops::geglu_packed_backward);
}

}  // namespace torchfast
