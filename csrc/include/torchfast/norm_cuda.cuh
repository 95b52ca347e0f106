// Building blocks of the row-wise CUDA kernels (rms_norm, add_rms_norm, layer_norm): one thread block
// per row (grid-stride over rows), the row walked in 16-byte vectors, sums reduced across the block
// in the op-math type (fp32; fp64 for double), and weight gradients summed per block into a partial
// row, then across blocks by a second kernel (no atomics: deterministic).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include <torchfast/cuda_utils.cuh>

namespace torchfast::cuda {

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// K running sums reduced together (LayerNorm's backward needs two).
template <typename A, int K>
struct Sums {
  A v[K];
};

template <typename A, int K>
__device__ __forceinline__ Sums<A, K> warp_sum(Sums<A, K> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) s.v[k] += __shfl_xor_sync(0xffffffffu, s.v[k], offset);
  }
  return s;
}

// The sums over every thread of the block, returned to every thread. `scratch` holds 32 entries; the
// trailing __syncthreads lets the caller reduce again right away (the next row reuses it).
template <typename A, int K>
__device__ __forceinline__ Sums<A, K> block_sum(Sums<A, K> s, Sums<A, K>* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  s = warp_sum(s);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  Sums<A, K> t;
#pragma unroll
  for (int k = 0; k < K; ++k) t.v[k] = A(0);
  if (lane < warps) t = scratch[lane];
  t = warp_sum(t);  // every warp reduces the 32 partials: the result lands in every thread
  __syncthreads();
  return t;
}

// Loads N consecutive elements of T (a single vector access when N > 1) as op-math values.
template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  const AlignedVec<T, N> v = *reinterpret_cast<const AlignedVec<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<A>(v.val[k]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  AlignedVec<T, N> v;
#pragma unroll
  for (int k = 0; k < N; ++k) v.val[k] = static_cast<T>(in[k]);
  *reinterpret_cast<AlignedVec<T, N>*>(p) = v;
}

// The launch of a row kernel: threads cover one row in vectors of N (a multiple of 32, at most
// launch::kMaxRowThreads, which is every row kernel's __launch_bounds__), blocks up to what the GPU holds
// at once, the rest by the grid-stride loop over rows (launch::row_threads / row_blocks, unit-tested on
// the host).
inline LaunchConfig row_launch(int64_t rows, int64_t n, int N) {
  const int threads = launch::row_threads(n, N);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks =
      launch::row_blocks(rows, threads, prop->multiProcessorCount, prop->maxThreadsPerMultiProcessor);
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads))};
}

// out[j] = sum over b < blocks of partial[b * n + j], rounded once to O.
template <typename A, typename O>
__global__ void sum_partials_kernel(const A* __restrict__ partial, O* __restrict__ out, int64_t blocks, int64_t n) {
  for (int64_t j = global_thread_id(); j < n; j += grid_stride()) {
    A s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[b * n + j];
    out[j] = static_cast<O>(s);
  }
}

template <typename A, typename O>
void sum_partials(const A* partial, O* out, int64_t blocks, int64_t n, cudaStream_t stream) {
  const LaunchConfig cfg = launch_config(n);
  sum_partials_kernel<<<cfg.grid, cfg.block, 0, stream>>>(partial, out, blocks, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(T{}, W{}) for the supported (activation, parameter) dtype pairs: W == T, or W == float for
// bf16/fp16 activations (AMP master weights), as the CPU kernels (rowwise.h, dispatch_float_weight).
template <typename Fn>
void dispatch_norm_types(c10::ScalarType x_dtype, c10::ScalarType w_dtype, const Fn& fn) {
  auto with_t = [&](auto tag) {
    using T = decltype(tag);
    if constexpr (is_reduced_v<T>) {
      if (w_dtype == c10::ScalarType::Float) return fn(T{}, float{});
    }
    return fn(T{}, T{});
  };
  switch (x_dtype) {
    case c10::ScalarType::Float:
      return with_t(float{});
    case c10::ScalarType::Double:
      return with_t(double{});
    case c10::ScalarType::BFloat16:
      return with_t(c10::BFloat16{});
    case c10::ScalarType::Half:
      return with_t(c10::Half{});
    default:
      TORCH_CHECK(false, "torchfast: internal error: unexpected dtype ", x_dtype);
  }
}

// The vector width a row kernel may use: 16 bytes of T when n is a multiple of it and every pointer
// (rows start at base + row * n) is aligned to its own vector size; else 1 (scalar accesses).
template <typename T, typename... Ptrs>
int row_vector_width(int64_t n, const Ptrs*... ptrs) {
  constexpr int N = kVecElems<T>;
  if (n % N != 0) return 1;
  const bool ok = ((ptrs == nullptr ||
                    reinterpret_cast<std::uintptr_t>(ptrs) % (sizeof(*ptrs) * N) == 0) && ...);
  return ok ? N : 1;
}

}  // namespace torchfast::cuda
