// layer_norm on CUDA: the same math, checks, outputs and statistics as layer_norm_cpu.cpp /
// layer_norm_kernel.cpp. One thread block per row; the mean, then the variance around it (never
// E[x^2] - E[x]^2), each reduced across the block; parameter gradients summed per block into partial
// rows (each thread owns the same columns of every row), then across blocks.
//
//   forward:  m = mean(x), r = 1 / sqrt(mean((x - m)^2) + eps),  y = (x - m) * r * w + b
//   backward: dx = r * g*w - r * sum(g*w) / n - (x - m) * r^3 * sum(g*w * (x - m)) / n
//             dw = sum_rows g * (x - m) * r,  db = sum_rows g
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
layer_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
                      T* __restrict__ y, at::opmath_type<T>* __restrict__ mean,
                      at::opmath_type<T>* __restrict__ rstd, int64_t rows, int64_t n, double eps) {
  using A = at::opmath_type<T>;
  __shared__ Sums<A, 1> scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * n;
    // The mean summed around the row's first element keeps the partial sums small on rows with a
    // large mean (see layer_norm_kernel.cpp).
    const A shift = static_cast<A>(xr[0]);
    Sums<A, 1> s{{A(0)}};
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A v[N];
      cuda::load_vec<N>(xr + j, v);
#pragma unroll
      for (int k = 0; k < N; ++k) s.v[0] += v[k] - shift;
    }
    s = cuda::block_sum(s, scratch);
    const A m = shift + s.v[0] / static_cast<A>(n);
    Sums<A, 1> q{{A(0)}};
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A v[N];
      cuda::load_vec<N>(xr + j, v);
#pragma unroll
      for (int k = 0; k < N; ++k) q.v[0] += (v[k] - m) * (v[k] - m);
    }
    q = cuda::block_sum(q, scratch);
    const A r = static_cast<A>(rsqrt(static_cast<double>(q.v[0]) / static_cast<double>(n) + eps));
    if (threadIdx.x == 0) {
      mean[row] = m;
      rstd[row] = r;
    }
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A v[N], wv[N], bv[N];
      cuda::load_vec<N>(xr + j, v);
      if (w != nullptr) cuda::load_vec<N>(w + j, wv);
      if (b != nullptr) cuda::load_vec<N>(b + j, bv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        A o = (v[k] - m) * r;
        if (w != nullptr) o *= wv[k];
        if (b != nullptr) o += bv[k];
        v[k] = o;
      }
      cuda::store_vec<N>(y + row * n + j, v);
    }
  }
}

template <int N, typename T, typename W>
__global__ void __launch_bounds__(launch::kMaxRowThreads, 1)
layer_norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, const W* __restrict__ w,
                      const at::opmath_type<T>* __restrict__ mean,
                      const at::opmath_type<T>* __restrict__ rstd, T* __restrict__ dx,
                      at::opmath_type<T>* __restrict__ partial_dw,
                      at::opmath_type<T>* __restrict__ partial_db, int64_t rows, int64_t n) {
  using A = at::opmath_type<T>;
  __shared__ Sums<A, 2> scratch[32];
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  A* pdw = partial_dw != nullptr ? partial_dw + blockIdx.x * n : nullptr;
  A* pdb = partial_db != nullptr ? partial_db + blockIdx.x * n : nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gr = g + row * n;
    const T* xr = x + row * n;
    const A m = mean[row], r = rstd[row];
    Sums<A, 2> s{{A(0), A(0)}};  // sum(g*w), sum(g*w * (x - m))
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A gv[N], xv[N], wv[N];
      cuda::load_vec<N>(gr + j, gv);
      cuda::load_vec<N>(xr + j, xv);
      if (w != nullptr) cuda::load_vec<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A gw = w != nullptr ? gv[k] * wv[k] : gv[k];
        s.v[0] += gw;
        s.v[1] += gw * (xv[k] - m);
      }
    }
    s = cuda::block_sum(s, scratch);
    const A inv_n = A(1) / static_cast<A>(n);
    const A c0 = -r * s.v[0] * inv_n, c1 = r * r * r * s.v[1] * inv_n;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < n; j += step) {
      A gv[N], xv[N], wv[N], out[N];
      cuda::load_vec<N>(gr + j, gv);
      cuda::load_vec<N>(xr + j, xv);
      if (w != nullptr) cuda::load_vec<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A xc = xv[k] - m;
        const A gw = w != nullptr ? gv[k] * wv[k] : gv[k];
        out[k] = r * gw + c0 - xc * c1;
        if (pdw != nullptr) pdw[j + k] += gv[k] * xc * r;
        if (pdb != nullptr) pdb[j + k] += gv[k];
      }
      cuda::store_vec<N>(dx + row * n + j, out);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias, double eps) {
  NormForward f = norm_forward("layer_norm", x, std::nullopt, weight, bias, eps, /*with_mean=*/true);
  if (f.rows == 0) return {f.y, f.mean, f.rstd};
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = f.n, rows = f.rows;
  const NormParams& p = f.p;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_norm_types(x.scalar_type(), p.dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = at::opmath_type<T>;
    const T* xp = static_cast<const T*>(f.x.const_data_ptr());
    const W* wp = static_cast<const W*>(ptr_or_null(p.w));
    const W* bp = static_cast<const W*>(ptr_or_null(p.b));
    T* yp = static_cast<T*>(f.y.mutable_data_ptr());
    A* mp = static_cast<A*>(f.mean.mutable_data_ptr());
    A* rs = static_cast<A*>(f.rstd.mutable_data_ptr());
    const int N = cuda::row_vector_width<T>(n, xp, yp, wp, bp);
    const cuda::LaunchConfig cfg = cuda::row_launch(rows, n, N);
    if (N > 1) {
      layer_norm_fwd_kernel<cuda::kVecElems<T>><<<cfg.grid, cfg.block, 0, stream>>>(xp, wp, bp, yp, mp, rs, rows, n, eps);
    } else {
      layer_norm_fwd_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(xp, wp, bp, yp, mp, rs, rows, n, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f.y, f.mean, f.rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> layer_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  NormBackward b = norm_backward("layer_norm_backward", "x", grad_out, std::nullopt, x, weight, bias, mean, rstd);
  std::optional<at::Tensor>& dw = b.dw;
  std::optional<at::Tensor>& db = b.db;
  if (b.rows == 0) return {b.dx, dw, db};
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = b.n, rows = b.rows;
  const NormParams& p = b.p;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::dispatch_norm_types(x.scalar_type(), p.dtype, [&](auto xt, auto wt) {
    using T = decltype(xt);
    using W = decltype(wt);
    using A = at::opmath_type<T>;
    const T* gp = static_cast<const T*>(b.grad_out.const_data_ptr());
    const T* xp = static_cast<const T*>(b.x.const_data_ptr());
    const W* wp = static_cast<const W*>(ptr_or_null(p.w));
    T* dxp = static_cast<T*>(b.dx.mutable_data_ptr());
    const int N = cuda::row_vector_width<T>(n, gp, xp, dxp, wp);
    const cuda::LaunchConfig cfg = cuda::row_launch(rows, n, N);
    const auto stats = x.options().dtype(stats_dtype(x));
    at::Tensor pw = dw ? at::zeros({static_cast<int64_t>(cfg.grid.x), n}, stats) : at::Tensor();
    at::Tensor pb = db ? at::zeros({static_cast<int64_t>(cfg.grid.x), n}, stats) : at::Tensor();
    A* pwp = pw.defined() ? static_cast<A*>(pw.mutable_data_ptr()) : nullptr;
    A* pbp = pb.defined() ? static_cast<A*>(pb.mutable_data_ptr()) : nullptr;
    const A* mp = static_cast<const A*>(b.mean.const_data_ptr());
    const A* rs = static_cast<const A*>(b.rstd.const_data_ptr());
    if (N > 1) {
      layer_norm_bwd_kernel<cuda::kVecElems<T>><<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, wp, mp, rs, dxp, pwp, pbp,
                                                                                   rows, n);
    } else {
      layer_norm_bwd_kernel<1><<<cfg.grid, cfg.block, 0, stream>>>(gp, xp, wp, mp, rs, dxp, pwp, pbp, rows, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dw) cuda::sum_partials(pwp, static_cast<W*>(dw->mutable_data_ptr()), cfg.grid.x, n, stream);
    if (db) cuda::sum_partials(pbp, static_cast<W*>(db->mutable_data_ptr()), cfg.grid.x, n, stream);
  });
  return {b.dx, dw, db};
}

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("layer_norm", &layer_norm_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

}  // namespace torchfast
