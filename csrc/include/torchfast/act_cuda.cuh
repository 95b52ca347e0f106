// CUDA building blocks of the bias_act and glu kernels: the activations and their derivatives as device
// functors (the math and special values of activations.h, the CPU twin), 16-byte vector access, and the
// launch size. Compute type C is float for float/bf16/fp16 (at::opmath_type) and double for double.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <torchfast/act_codes.h>
#include <torchfast/launch_math.h>
#include <torchfast/row_ptr.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchfast::act_cuda {

// Accurate exp and normal CDF (a few ULP; normcdf is erfc-based, so accurate in the lower tail), not
// the fast intrinsics: these kernels are memory-bound, and the intrinsics' error grows with |x|.
__device__ __forceinline__ float exp_(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }
__device__ __forceinline__ float normcdf_(float x) { return ::normcdff(x); }
__device__ __forceinline__ double normcdf_(double x) { return ::normcdf(x); }

struct Identity {
  template <typename C>
  __device__ __forceinline__ static C fwd(C x) { return x; }
  template <typename C>
  __device__ __forceinline__ static C bwd(C g, C) { return g; }
};

// Gradient passes where !(x <= 0), as torch's threshold_backward (so also at NaN).
struct Relu {
  template <typename C>
  __device__ __forceinline__ static C fwd(C x) { return x <= C(0) ? C(0) : x; }
  template <typename C>
  __device__ __forceinline__ static C bwd(C g, C x) { return x <= C(0) ? C(0) : g; }
};

struct Swish {
  template <typename C>
  __device__ __forceinline__ static C fwd(C x) { return x / (C(1) + exp_(-x)); }
  template <typename C>
  __device__ __forceinline__ static void fwd_deriv(C x, C& y, C& d) {
    const C s = C(1) / (C(1) + exp_(-x));
    y = x * s;
    d = s * (C(1) + x * (C(1) - s));
  }
  template <typename C>
  __device__ __forceinline__ static C bwd(C g, C x) {
    C y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x).
struct Gelu {
  template <typename C>
  __device__ __forceinline__ static C fwd(C x) { return x * normcdf_(x); }
  template <typename C>
  __device__ __forceinline__ static void fwd_deriv(C x, C& y, C& d) {
    const C c = normcdf_(x);
    y = x * c;
    d = c + x * (C(0.3989422804014327) * exp_(C(-0.5) * x * x));
  }
  template <typename C>
  __device__ __forceinline__ static C bwd(C g, C x) {
    C y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// gelu_tanh(x) = x s, s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); see activations.h for the
// sigmoid form and the clamp that keeps 0 * inf out of the derivative for large finite x.
struct GeluTanh {
  template <typename C>
  __device__ __forceinline__ static C sig2u(C x) {
    const C u = C(0.7978845608028654) * x * (C(1) + C(0.044715) * x * x);
    return C(1) / (C(1) + exp_(C(-2) * u));
  }
  template <typename C>
  __device__ __forceinline__ static C fwd(C x) { return x * sig2u(x); }
  template <typename C>
  __device__ __forceinline__ static void fwd_deriv(C x, C& y, C& d) {
    const C s = sig2u(x);
    const C xc = x < C(-1e4) ? C(-1e4) : (x > C(1e4) ? C(1e4) : x);  // NaN stays in x itself
    const C du = C(0.7978845608028654) * (C(1) + C(3 * 0.044715) * xc * xc);
    y = x * s;
    d = s + (x * s * (C(1) - s)) * (C(2) * du);
  }
  template <typename C>
  __device__ __forceinline__ static C bwd(C g, C x) {
    C y, d;
    fwd_deriv(x, y, d);
    return g * d;
  }
};

// Calls fn(Act{}) for activation `code`; gated=true admits only the activations of swiglu/geglu.
template <bool kGated = false, typename Fn>
void dispatch_act(int code, const Fn& fn) {
  switch (static_cast<ActCode>(code)) {
    case ActCode::Swish:
      return fn(Swish{});
    case ActCode::Gelu:
      return fn(Gelu{});
    case ActCode::GeluTanh:
      return fn(GeluTanh{});
    default:
      break;
  }
  if constexpr (!kGated) {
    if (static_cast<ActCode>(code) == ActCode::Relu) return fn(Relu{});
    if (static_cast<ActCode>(code) == ActCode::Identity) return fn(Identity{});
  }
  TORCH_CHECK(false, "torchfast: internal error: unexpected activation code ", code);
}

// N elements of T in one aligned access (N * sizeof(T) = 16 bytes for the vector path, N = 1 scalar).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Threads per block of the bias_act and glu kernels (and of bias_act's column reduction, 32 x 8).
constexpr int kThreads = launch::kMapThreads;

// Blocks of kThreads for `items` grid-stride work items: enough to fill the device, no more.
inline dim3 blocks_for(int64_t items) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return dim3(static_cast<unsigned>(
      launch::grid_stride_blocks(items, kThreads, prop->multiProcessorCount, prop->maxThreadsPerMultiProcessor)));
}

// Runs launch_fn(N, index type, grid, c0, len) over the columns [c0, c0 + len): all of them, except that a
// single flat row whose length is not a multiple of the vector width is split into a vector body and
// a scalar tail. N is the widest access every row start allows. Indices are 32-bit only when the loop
// cannot wrap them (launch::map_launch / fits_int32_loop: the element count and the loop variable's
// last value, one grid stride past the end, both below 2^31); else 64-bit.
template <typename T, typename Launch>
void launch_rows(int64_t rows, int64_t cols, std::initializer_list<const void*> ptrs,
                 std::initializer_list<int64_t> strides, const Launch& launch_fn) {
  constexpr int NV = kVec<T>;
  const int64_t body = rows == 1 ? cols - cols % NV : cols;
  auto run = [&](int64_t c0, int64_t len, bool try_vec) {
    std::vector<const void*> shifted;
    for (const void* p : ptrs) shifted.push_back(static_cast<const T*>(p) + c0);
    bool vec = try_vec && len % NV == 0;
    for (const void* p : shifted) vec = vec && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
    for (int64_t s : strides) vec = vec && s % NV == 0;
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const launch::MapLaunch m =
        launch::map_launch(rows * len, vec ? NV : 1, prop->multiProcessorCount, prop->maxThreadsPerMultiProcessor);
    const dim3 grid(static_cast<unsigned>(m.blocks));
    const bool small = m.int32;
    if (vec && small) {
      launch_fn(std::integral_constant<int, NV>{}, int32_t{}, grid, c0, len);
    } else if (vec) {
      launch_fn(std::integral_constant<int, NV>{}, int64_t{}, grid, c0, len);
    } else if (small) {
      launch_fn(std::integral_constant<int, 1>{}, int32_t{}, grid, c0, len);
    } else {
      launch_fn(std::integral_constant<int, 1>{}, int64_t{}, grid, c0, len);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (body > 0) run(0, body, true);
  if (body < cols) run(body, cols - body, false);
}

}  // namespace torchfast::act_cuda
