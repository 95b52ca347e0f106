// rms_norm and add_rms_norm on CUDA: the same math, checks, outputs and statistics as rms_norm_cpu.cpp /
// rms_norm_kernel.cpp. One thread block per row; each thread owns the same columns of every row it
// visits, so add_rms_norm's second sweep re-reads the h it wrote itself (no synchronization needed) and
// the weight-gradient partial row of its block is updated without races.
//
//   forward:  r = 1 / sqrt(mean(x^2) + eps),  y = x * r * w       (h = round(x + residual) first)
//   backward: dx = r * g * w - x * r^3 * sum(g * w * x) / n  (+ grad_h),  dw = sum_rows g * x * r
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include <torchfast/norm.h>
#include <torchfast/norm_cuda.cuh>

namespace torchfast {
namespace {

using cuda::Sums;

template <int N, typename T, typename W>
__global__ void __launch_bounds__(launch::kMaxRowThreads, 1)
rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                    const W* __restrict__ w, T* __restrict__ y, T* __restrict__ h,
                    at::opmath_type<T>* __restrict__ rstd, int64_t rows, int64_t n, double eps) {
  using A = at::opmath_type<T>;
  __shared__ Sums<A, 1> scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* src = x + row * n;
    Sums<A, 1> ss{{A(0)}};
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A v[N];
      cuda::load_vec<N>(src + j, v);
      if (residual != nullptr) {
        A r[N];
        cuda::load_vec<N>(residual + row * n + j, r);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = static_cast<A>(static_cast<T>(v[k] + r[k]));  // rounded h
        cuda::store_vec<N>(h + row * n + j, v);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) ss.v[0] += v[k] * v[k];
    }
    ss = cuda::block_sum(ss, scratch);
    const A r = static_cast<A>(rsqrt(static_cast<double>(ss.v[0]) / static_cast<double>(n) + eps));
    if (threadIdx.x == 0) rstd[row] = r;
    if (residual != nullptr) src = h + row * n;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A v[N];
      cuda::load_vec<N>(src + j, v);
      if (w != nullptr) {
        A wv[N];
        cuda::load_vec<N>(w + j, wv);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = v[k] * r * wv[k];
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = v[k] * r;
      }
      cuda::store_vec<N>(y + row * n + j, v);
    }
  }
}

template <int N, typename T, typename W>
__global__ void __launch_bounds__(launch::kMaxRowThreads, 1)
rms_norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const W* __restrict__ w,
                    const at::opmath_type<T>* __restrict__ rstd, const T* __restrict__ gsum,
                    T* __restrict__ dx, at::opmath_type<T>* __restrict__ partial_dw,
                    int64_t rows, int64_t n) {
  using A = at::opmath_type<T>;
  __shared__ Sums<A, 1> scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  A* pdw = partial_dw != nullptr ? partial_dw + blockIdx.x * n : nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gr = g + row * n;
    const T* xr = x + row * n;
    const A r = rstd[row];
    Sums<A, 1> dot{{A(0)}};
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A gv[N], xv[N], wv[N];
      cuda::load_vec<N>(gr + j, gv);
      cuda::load_vec<N>(xr + j, xv);
      if (w != nullptr) {
        cuda::load_vec<N>(w + j, wv);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) wv[k] = A(1);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) dot.v[0] += gv[k] * wv[k] * xv[k];
    }
    dot = cuda::block_sum(dot, scratch);
    const A coef = r * r * r * dot.v[0] / static_cast<A>(n);
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A gv[N], xv[N], wv[N], out[N];
      cuda::load_vec<N>(gr + j, gv);
      cuda::load_vec<N>(xr + j, xv);
      if (w != nullptr) {
        cuda::load_vec<N>(w + j, wv);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) wv[k] = A(1);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = r * gv[k] * wv[k] - coef * xv[k];
      if (gsum != nullptr) {
        A sv[N];
        cuda::load_vec<N>(gsum + row * n + j, sv);
#pragma unroll
        for (int k = 0; k < N; ++k) out[k] += sv[k];
      }
      cuda::store_vec<N>(dx + row * n + j, out);
      if (pdw != nullptr) {
#pragma unroll
        for (int k = 0; k < N; ++k) pdw[j + k] += gv[k] * xv[k] * r;
      }
    }
  }
}

// Shared forward of rms_norm and add_rms_norm (h and the residual only for the latter).
NormForward forward(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                    const std::optional<at::Tensor>& weight, double eps) {
  NormForward f = norm_forward(op, x, residual, weight, std::nullopt, eps, /*with_mean=*/false);
  if (f.rows == 0) return f;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = f.n, rows = f.rows;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_norm_types(x.scalar_type(), f.p.dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = at::opmath_type<T>;
    const T* xp = static_cast<const T*>(f.x.const_data_ptr());
    const T* rp = static_cast<const T*>(ptr_or_null(f.residual));
    const W* wp = static_cast<const W*>(ptr_or_null(f.p.w));
    T* yp = static_cast<T*>(f.y.mutable_data_ptr());
    T* hp = f.h.defined() ? static_cast<T*>(f.h.mutable_data_ptr()) : nullptr;
    A* rs = static_cast<A*>(f.rstd.mutable_data_ptr());
    const int N = cuda::row_vector_width<T>(n, xp, rp, yp, hp, wp);
    const cuda::LaunchConfig cfg = cuda::row_launch(rows, n, N);
    if (N > 1) {
      rms_norm_fwd_kernel<cuda::kVecElems<T>><<<cfg.grid, cfg.block, 0, stream>>>(xp, rp, wp, yp, hp, rs, rows, n, eps);
    } else {
      rms_norm_fwd_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(xp, rp, wp, yp, hp, rs, rows, n, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return f;
}

// Shared backward: dx (plus grad_h when given) and, with a weight, dw in the weight's dtype.
std::tuple<at::Tensor, std::optional<at::Tensor>> backward(const char* op, const char* x_arg,
                                                           const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_h,
                                                           const at::Tensor& x,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& rstd) {
  NormBackward b = norm_backward(op, x_arg, grad_out, grad_h, x, weight, std::nullopt, std::nullopt, rstd);
  if (b.rows == 0) return {b.dx, b.dw};
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = b.n, rows = b.rows;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_norm_types(x.scalar_type(), b.p.dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = at::opmath_type<T>;
    const T* gp = static_cast<const T*>(b.grad_out.const_data_ptr());
    const T* xp = static_cast<const T*>(b.x.const_data_ptr());
    const T* sp = static_cast<const T*>(ptr_or_null(b.grad_h));
    const W* wp = static_cast<const W*>(ptr_or_null(b.p.w));
    T* dxp = static_cast<T*>(b.dx.mutable_data_ptr());
    const int N = cuda::row_vector_width<T>(n, gp, xp, sp, dxp, wp);
    const cuda::LaunchConfig cfg = cuda::row_launch(rows, n, N);
    at::Tensor partial;
    if (b.dw) partial = at::zeros({static_cast<int64_t>(cfg.grid.x), n}, x.options().dtype(stats_dtype(x)));
    A* pp = partial.defined() ? static_cast<A*>(partial.mutable_data_ptr()) : nullptr;
    const A* rs = static_cast<const A*>(b.rstd.const_data_ptr());
    if (N > 1) {
      rms_norm_bwd_kernel<cuda::kVecElems<T>><<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, wp, rs, sp, dxp, pp, rows, n);
    } else {
      rms_norm_bwd_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, wp, rs, sp, dxp, pp, rows, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (b.dw) cuda::sum_partials(pp, static_cast<W*>(b.dw->mutable_data_ptr()), cfg.grid.x, n, stream);
  });
  return {b.dx, b.dw};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                 double eps) {
  NormForward f = forward("rms_norm", x, std::nullopt, weight, eps);
  return {f.y, f.rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                                         const at::Tensor& x,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const at::Tensor& rstd) {
  return backward("rms_norm_backward", "x", grad_out, std::nullopt, x, weight, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 double eps) {
  NormForward f = forward("add_rms_norm", x, residual, weight, eps);
  return {f.y, f.h, f.rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> add_rms_norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  return backward("add_rms_norm_backward", "h", grad_out, grad_h, h, weight, rstd);
}

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cuda);
}

}  // namespace torchfast
