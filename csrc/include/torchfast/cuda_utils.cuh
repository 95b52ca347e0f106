// Building blocks for torchfast's CUDA kernels: 16-byte vectors, the alignment test that decides
// whether they may be used, the launch configuration, and elementwise maps over one or two inputs
// built from them. The CUDA twin of elementwise.h.
//
// The maps read and write memory linearly (the caller has already put every tensor in the output's
// layout, see checks.h), convert each element to its op-math type (float for bf16/fp16, double for
// double) before calling the functor and round once on store. Indices are int64 throughout and the
// loops are grid-stride, so a tensor over 2^31 elements is covered with a grid of any size.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include <torchfast/launch_math.h>

namespace torchfast::cuda {

// Elements of T in one 16-byte access: the widest load/store a thread can issue (ld.global.v4.u32),
// which is what lets a memory-bound kernel reach full bandwidth with few instructions.
constexpr int kVecBytes = 16;
template <typename T>
constexpr int kVecElems = kVecBytes / static_cast<int>(sizeof(T));

// N elements of T, aligned to their total size, so a load of one is a single vector instruction.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// True when every pointer is aligned to `bytes`. A view that starts inside its storage (x[1:]) is
// not, and must take the scalar path: a misaligned vector load is a hard fault on the GPU.
template <typename... Ptrs>
inline bool all_aligned(int bytes, const Ptrs*... ptrs) {
  return ((reinterpret_cast<std::uintptr_t>(ptrs) % bytes == 0) && ...);
}

template <typename I>
constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

struct LaunchConfig {
  dim3 grid;
  dim3 block;
};

// A 1-D launch for `work_items` independent items, consumed by a grid-stride loop: enough blocks to
// fill every SM of the current device to its thread limit, no more, never an empty grid
// (launch::grid_stride_blocks, unit-tested on the host).
inline LaunchConfig launch_config(int64_t work_items, int threads = 256) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks =
      launch::grid_stride_blocks(work_items, threads, prop->multiProcessorCount, prop->maxThreadsPerMultiProcessor);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads))};
}

__device__ __forceinline__ int64_t global_thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Accurate exp (a few ULP), not the __expf intrinsic: that one's error grows with |x| and would show
// at fp32 tolerance for large inputs, while these kernels are memory-bound anyway. exp(+inf) = +inf
// and exp(-inf) = 0 as IEEE says, which the activations rely on for their infinities.
__device__ __forceinline__ float exp_op(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_op(double x) { return ::exp(x); }

// out[i] = fn(in[i]) for i < n. N = kVecElems<T> needs every pointer 16-byte aligned; N = 1 is the
// scalar path. With N > 1 the last n % N elements are done one by one after the vector loop.
template <int N, typename T, typename Fn>
__global__ void map1_kernel(Fn fn, T* __restrict__ out, const T* __restrict__ in, int64_t n) {
  using C = at::opmath_type<T>;
  using V = AlignedVec<T, N>;
  const int64_t n_vec = n / N;
  for (int64_t v = global_thread_id(); v < n_vec; v += grid_stride()) {
    const V a = reinterpret_cast<const V*>(in)[v];
    V r;
#pragma unroll
    for (int k = 0; k < N; ++k) r.val[k] = static_cast<T>(fn(static_cast<C>(a.val[k])));
    reinterpret_cast<V*>(out)[v] = r;
  }
  for (int64_t i = n_vec * N + global_thread_id(); i < n; i += grid_stride()) {
    out[i] = static_cast<T>(fn(static_cast<C>(in[i])));
  }
}

// out[i] = fn(a[i], b[i]) for i < n; same rules as map1_kernel.
template <int N, typename T, typename Fn>
__global__ void map2_kernel(Fn fn, T* __restrict__ out, const T* __restrict__ a,
                            const T* __restrict__ b, int64_t n) {
  using C = at::opmath_type<T>;
  using V = AlignedVec<T, N>;
  const int64_t n_vec = n / N;
  for (int64_t v = global_thread_id(); v < n_vec; v += grid_stride()) {
    const V va = reinterpret_cast<const V*>(a)[v];
    const V vb = reinterpret_cast<const V*>(b)[v];
    V r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      r.val[k] = static_cast<T>(fn(static_cast<C>(va.val[k]), static_cast<C>(vb.val[k])));
    }
    reinterpret_cast<V*>(out)[v] = r;
  }
  for (int64_t i = n_vec * N + global_thread_id(); i < n; i += grid_stride()) {
    out[i] = static_cast<T>(fn(static_cast<C>(a[i]), static_cast<C>(b[i])));
  }
}

// Launch `fn` over n > 0 contiguous elements on the current stream of the current device (the
// caller holds a device guard), vectorized when the pointers allow it.
template <typename T, typename Fn>
void map1(Fn fn, T* out, const T* in, int64_t n) {
  constexpr int N = kVecElems<T>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (all_aligned(kVecBytes, out, in)) {
    const LaunchConfig cfg = launch_config(ceil_div<int64_t>(n, N));
    map1_kernel<N><<<cfg.grid, cfg.block, 0, stream>>>(fn, out, in, n);
  } else {
    const LaunchConfig cfg = launch_config(n);
    map1_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(fn, out, in, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Fn>
void map2(Fn fn, T* out, const T* a, const T* b, int64_t n) {
  constexpr int N = kVecElems<T>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (all_aligned(kVecBytes, out, a, b)) {
    const LaunchConfig cfg = launch_config(ceil_div<int64_t>(n, N));
    map2_kernel<N><<<cfg.grid, cfg.block, 0, stream>>>(fn, out, a, b, n);
  } else {
    const LaunchConfig cfg = launch_config(n);
    map2_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(fn, out, a, b, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torchfast::cuda
