// bias_act on CUDA: the same math, checks and output layout as on CPU (bias_act.h, activations.h).
//
//   forward:  y[r, c]  = act(x[r, c] + b[c])
//   backward: dx[r, c] = dy[r, c] * act'(x[r, c] + b[c]),   db[c] = sum_r dx[r, c]
//
// The forward and the bias-free backward are row-wise maps, 16 bytes per access when the rows allow
// it. The backward with a bias sums db without atomics, deterministically: a block owns 32 columns and
// a slice of the rows, each thread sums its column down its rows in the compute type (fp32, or fp64 for
// double), the block reduces its 8 row-threads in shared memory and writes one partial row; a second
// kernel adds the partial rows. The unrounded dx is summed, as on CPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <torchfast/act_cuda.cuh>

#include "bias_act.h"

namespace torchfast {
namespace {

using act_cuda::Vec;

// y = act(x + bias) over rows x cols (n = rows * cols), N elements per step (cols % N == 0).
template <int N, typename I, typename T, typename A, bool kBias>
__global__ void bias_act_fwd_kernel(I rows, I cols, const T* __restrict__ x, int64_t x_rs,
                                    const at::opmath_type<T>* __restrict__ bias, T* __restrict__ y,
                                    int64_t y_rs) {
  using C = at::opmath_type<T>;
  const I n_vec = rows * cols / N;
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < n_vec; v += gridDim.x * blockDim.x) {
    const I i = v * N, r = i / cols, c = i - r * cols;
    const Vec<T, N> in = *reinterpret_cast<const Vec<T, N>*>(x + r * x_rs + c);
    Vec<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      C p = static_cast<C>(in.v[k]);
      if constexpr (kBias) p += bias[c + k];
      out.v[k] = static_cast<T>(A::fwd(p));
    }
    *reinterpret_cast<Vec<T, N>*>(y + r * y_rs + c) = out;
  }
}

// dx = dy * act'(x (+ bias)) without a bias gradient.
template <int N, typename I, typename T, typename A, bool kBias>
__global__ void bias_act_dx_kernel(I rows, I cols, const T* __restrict__ g, int64_t g_rs, const T* __restrict__ x,
                                   int64_t x_rs, const at::opmath_type<T>* __restrict__ bias, T* __restrict__ dx,
                                   int64_t dx_rs) {
  using C = at::opmath_type<T>;
  const I n_vec = rows * cols / N;
  for (I v = blockIdx.x * blockDim.x + threadIdx.x; v < n_vec; v += gridDim.x * blockDim.x) {
    const I i = v * N, r = i / cols, c = i - r * cols;
    const Vec<T, N> gv = *reinterpret_cast<const Vec<T, N>*>(g + r * g_rs + c);
    const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(x + r * x_rs + c);
    Vec<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      C p = static_cast<C>(xv.v[k]);
      if constexpr (kBias) p += bias[c + k];
      out.v[k] = static_cast<T>(A::bwd(static_cast<C>(gv.v[k]), p));
    }
    *reinterpret_cast<Vec<T, N>*>(dx + r * dx_rs + c) = out;
  }
}

constexpr int kColsPerBlock = 32;  // one warp across columns: coalesced rows
constexpr int kRowThreads = act_cuda::kThreads / kColsPerBlock;

// dx as above, and partial[blockIdx.y, c] = sum of dx[r, c] over the rows this block's threads visit.
template <typename T, typename A>
__global__ void bias_act_bwd_reduce_kernel(int64_t rows, int64_t cols, const T* __restrict__ g, int64_t g_rs,
                                           const T* __restrict__ x, int64_t x_rs,
                                           const at::opmath_type<T>* __restrict__ bias, T* __restrict__ dx,
                                           int64_t dx_rs, at::opmath_type<T>* __restrict__ partial) {
  using C = at::opmath_type<T>;
  __shared__ C sums[kRowThreads][kColsPerBlock];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + threadIdx.x;
  C acc = 0;
  if (c < cols) {
    const C b = bias[c];
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowThreads + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kRowThreads) {
      const C d = A::bwd(static_cast<C>(g[r * g_rs + c]), static_cast<C>(x[r * x_rs + c]) + b);
      dx[r * dx_rs + c] = static_cast<T>(d);
      acc += d;
    }
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
#pragma unroll
    for (int k = 1; k < kRowThreads; ++k) acc += sums[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + c] = acc;
  }
}

template <typename C>
__global__ void sum_partials_kernel(int64_t parts, int64_t cols, const C* __restrict__ partial, C* __restrict__ out) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    C acc = 0;
    for (int64_t p = 0; p < parts; ++p) acc += partial[p * cols + c];
    out[c] = acc;
  }
}

struct Cuda {
  using Guard = c10::cuda::CUDAGuard;

  static void fwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr x, const void* bias,
                  RowPtrMut y) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bias_act_cuda", [&] {
      using C = at::opmath_type<scalar_t>;
      act_cuda::dispatch_act(act, [&](auto a) {
        using A = decltype(a);
        const auto* xp = static_cast<const scalar_t*>(x.ptr);
        auto* yp = static_cast<scalar_t*>(y.ptr);
        const auto* bp = static_cast<const C*>(bias);
        act_cuda::launch_rows<scalar_t>(rows, cols, {xp, yp}, {x.row_stride, y.row_stride},
                                        [&](auto n, auto idx, dim3 grid, int64_t c0, int64_t len) {
          using I = decltype(idx);
          if (bp != nullptr) {
            bias_act_fwd_kernel<decltype(n)::value, I, scalar_t, A, true>
                <<<grid, act_cuda::kThreads, 0, stream>>>(rows, len, xp + c0, x.row_stride, bp + c0, yp + c0,
                                                          y.row_stride);
          } else {
            bias_act_fwd_kernel<decltype(n)::value, I, scalar_t, A, false>
                <<<grid, act_cuda::kThreads, 0, stream>>>(rows, len, xp + c0, x.row_stride, bp, yp + c0,
                                                          y.row_stride);
          }
        });
      });
    });
  }

  static void bwd(c10::ScalarType dtype, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr x,
                  const void* bias, RowPtrMut grad_in, void* grad_bias) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bias_act_backward_cuda", [&] {
      using C = at::opmath_type<scalar_t>;
      act_cuda::dispatch_act(act, [&](auto a) {
        using A = decltype(a);
        const auto* gp = static_cast<const scalar_t*>(grad_out.ptr);
        const auto* xp = static_cast<const scalar_t*>(x.ptr);
        auto* dp = static_cast<scalar_t*>(grad_in.ptr);
        const auto* bp = static_cast<const C*>(bias);
        if (grad_bias == nullptr) {
          act_cuda::launch_rows<scalar_t>(rows, cols, {gp, xp, dp},
                                          {grad_out.row_stride, x.row_stride, grad_in.row_stride},
                                          [&](auto n, auto idx, dim3 grid, int64_t c0, int64_t len) {
            using I = decltype(idx);
            if (bp != nullptr) {
              bias_act_dx_kernel<decltype(n)::value, I, scalar_t, A, true><<<grid, act_cuda::kThreads, 0, stream>>>(
                  rows, len, gp + c0, grad_out.row_stride, xp + c0, x.row_stride, bp + c0, dp + c0,
                  grad_in.row_stride);
            } else {
              bias_act_dx_kernel<decltype(n)::value, I, scalar_t, A, false><<<grid, act_cuda::kThreads, 0, stream>>>(
                  rows, len, gp + c0, grad_out.row_stride, xp + c0, x.row_stride, bp, dp + c0, grad_in.row_stride);
            }
          });
          return;
        }
        // Enough row slices to fill the device (about 8 blocks per SM), at most one per 8 rows and 65535
        // (gridDim.y); the slice loop in the kernel covers any number of rows.
        const int64_t col_blocks = launch::ceil_div(cols, kColsPerBlock);
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t slices = launch::column_reduce_slices(rows, cols, kColsPerBlock, kRowThreads, sms);
        at::Tensor partial = at::empty({slices, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value)
                                                           .device(at::kCUDA, at::cuda::current_device()));
        bias_act_bwd_reduce_kernel<scalar_t, A>
            <<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(slices)), dim3(kColsPerBlock, kRowThreads),
               0, stream>>>(rows, cols, gp, grad_out.row_stride, xp, x.row_stride, bp, dp, grad_in.row_stride,
                            partial.mutable_data_ptr<C>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_partials_kernel<C><<<act_cuda::blocks_for(cols), act_cuda::kThreads, 0, stream>>>(
            slices, cols, partial.const_data_ptr<C>(), static_cast<C*>(grad_bias));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("bias_act", &bias_act_op::bias_act<Cuda>);
  m.impl("bias_act_backward", &bias_act_op::bias_act_backward<Cuda>);
}

}  // namespace torchfast
