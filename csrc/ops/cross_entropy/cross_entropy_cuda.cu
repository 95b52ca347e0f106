// cross_entropy and linear_cross_entropy on CUDA: the same math, checks (cross_entropy.h), outputs and
// chunking as cross_entropy_cpu.cpp / cross_entropy_kernel.cpp. Math: torchfast/reference/cross_entropy.py.
// With s = softcap(x), p = softmax(s), eps = label smoothing, z = z-loss, g = the row's incoming gradient:
//
//   forward:  lse = log sum exp(s),  loss = lse - (1 - eps) s_t - eps mean(s) + z lse^2   (0 if ignored)
//   backward: dx_j = g (p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == t]) (1 - (s_j / c)^2)
//
// One thread block per row, grid-stride over rows (int64 indices, grid capped at what the GPU holds).
// The forward reads the row once: each thread keeps a running max m and sum-of-exp S over its own
// 16-byte vectors (S rescaled by exp(m_old - m_new) when a vector raises the max: one extra exp per
// vector, not per element), then the block merges the (m, S) pairs with the same rescaling rule. The
// backward recomputes p from the saved lse. One kernel does both for linear_cross_entropy's chunks: the
// gradient sweep overwrites the logits in place (each element is read and written by the same thread,
// and the target logit is read before the block's first barrier, so no thread sees a written value).
//
// Special values as the CPU kernel and F.cross_entropy: NaN or +inf in s makes lse and the loss NaN; a
// row of only -inf has lse -inf and loss NaN; a -inf target logit gives +inf. A target that is neither
// ignore_index nor in [0, V) trips CUDA_KERNEL_ASSERT (a device-side assert, as torch's nll_loss; the CPU
// backend raises IndexError instead, having checked the targets on the host, which CUDA cannot do
// without a device-to-host sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include <torchfast/cuda_utils.cuh>
#include <torchfast/norm_cuda.cuh>
#include <torchfast/rows.h>

#include "cross_entropy.h"
#include "cross_entropy_linear.h"

namespace torchfast {
namespace {

// ---- device code ------------------------------------------------------------------------------------

__device__ __forceinline__ float log_(float x) { return ::logf(x); }
__device__ __forceinline__ double log_(double x) { return ::log(x); }
__device__ __forceinline__ float tanh_(float x) { return ::tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return ::tanh(x); }

// The options in the math type A, precomputed once per launch (eps / V in double first, as the CPU).
template <typename A>
struct RowParams {
  int64_t ignore_index;
  A eps;            // label_smoothing
  A one_minus_eps;  // 1 - label_smoothing, rounded once
  A eps_v;          // label_smoothing / V
  A z;              // z_loss
  A cap;            // softcap; 0 = none
  A inv_cap;
};

template <typename A>
__device__ __forceinline__ A softcap(A x, const RowParams<A>& p) {
  return p.cap > A(0) ? p.cap * tanh_(x * p.inv_cap) : x;
}

// One thread's (or a merged group's) running statistics of a row: max m, sum of exp(s - m), sum of s
// (for label smoothing) and whether a NaN or +inf was seen (the row's answer is then NaN, whatever
// m and S hold). The empty state is (-inf, 0, 0, 0).
template <typename A>
struct RowStats {
  A m, s, total;
  int bad;
};

template <typename A>
__device__ __forceinline__ RowStats<A> merge(const RowStats<A>& a, const RowStats<A>& b) {
  RowStats<A> r;
  r.m = a.m > b.m ? a.m : b.m;
  // m is never NaN or +inf (such vectors only set `bad`), so the exps below are of values <= 0 or of
  // -inf (exp = 0); both -inf means both sums are 0, and -inf - -inf would be NaN.
  r.s = r.m == -std::numeric_limits<A>::infinity()
            ? A(0)
            : a.s * cuda::exp_op(a.m - r.m) + b.s * cuda::exp_op(b.m - r.m);
  r.total = a.total + b.total;
  r.bad = a.bad | b.bad;
  return r;
}

template <typename A>
__device__ __forceinline__ RowStats<A> warp_merge(RowStats<A> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowStats<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    o.total = __shfl_xor_sync(0xffffffffu, st.total, offset);
    o.bad = __shfl_xor_sync(0xffffffffu, st.bad, offset);
    st = merge(st, o);
  }
  return st;
}

// The statistics of the whole block, returned to every thread (as cuda::block_sum: blockDim.x is a
// multiple of 32, so every warp is full and the full-mask shuffles are valid; threads that had no
// element hold the empty state). Every warp merges the same 32 partials in the same order, so all
// threads get bit-identical results. The trailing barrier lets the next row reuse `scratch`.
template <typename A>
__device__ __forceinline__ RowStats<A> block_merge(RowStats<A> st, RowStats<A>* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  st = warp_merge(st);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  RowStats<A> t{-std::numeric_limits<A>::infinity(), A(0), A(0), 0};
  if (lane < warps) t = scratch[lane];
  t = warp_merge(t);
  __syncthreads();
  return t;
}

// Elements of T before the first 16-byte aligned one of `row`, at most n; n (all scalar) when the row
// is not even aligned to its element size.
template <int N, typename T>
__device__ __forceinline__ int64_t aligned_head(const T* row, int64_t n) {
  const auto addr = reinterpret_cast<std::uintptr_t>(row);
  if (addr % sizeof(T) != 0) return n;
  const int64_t head = static_cast<int64_t>((cuda::kVecBytes - addr % cuda::kVecBytes) % cuda::kVecBytes / sizeof(T));
  return head < n ? head : n;
}

// Calls f(j, v) for every element of the row, v holding the values at j, j + 1, ... (an array of N or
// of 1), converted to the math type. The first `head` and the last (n - head) % N elements go one by
// one; the body between them in 16-byte vectors. Each thread gets the same elements whenever it visits
// the same row with the same head, which is what makes the in-place backward race-free.
template <int N, typename T, typename F>
__device__ __forceinline__ void visit_row(const T* row, int64_t n, int64_t head, F& f) {
  using A = at::opmath_type<T>;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const int64_t body = (n - head) / N;
  for (int64_t i = tid; i < body; i += nt) {
    const int64_t j = head + i * N;
    A v[N];
    cuda::load_vec<N>(row + j, v);
    f(j, v);
  }
  const int64_t tail = head + body * N;
  const int64_t edge = head + (n - tail);  // scalar elements: the head, then the tail
  for (int64_t e = tid; e < edge; e += nt) {
    const int64_t j = e < head ? e : tail + (e - head);
    A v[1] = {static_cast<A>(row[j])};
    f(j, v);
  }
}

// kFwd: compute lse (written to lse[row]) and the loss (loss[row]); else read lse[row].
// kBwd: write d loss / d x scaled by grad[row * grad_stride] to dx (which may be x itself).
// x and dx may alias, hence no __restrict__ on them. __launch_bounds__: row_launch may pick 1024 threads
// (V >= 32K bf16), and without the bound ptxas gave the fp64 backward 77 registers, more than an SM
// holds for 1024 threads (64K registers): the launch would fail with "too many resources requested".
template <int N, typename T, bool kFwd, bool kBwd>
__global__ void __launch_bounds__(launch::kMaxRowThreads, 1)
ce_rows_kernel(const T* x, int64_t x_stride, const int64_t* __restrict__ target, int64_t rows,
               int64_t n, RowParams<at::opmath_type<T>> p, at::opmath_type<T>* __restrict__ loss,
               at::opmath_type<T>* lse, const at::opmath_type<T>* __restrict__ grad,
               int64_t grad_stride, T* dx, int64_t dx_stride) {
  using A = at::opmath_type<T>;
  constexpr A kInf = std::numeric_limits<A>::infinity();
  __shared__ RowStats<A> scratch[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const int64_t t = target[row];
    const bool ignored = t == p.ignore_index;
    const bool in_range = t >= 0 && t < n;
    if (threadIdx.x == 0 && !ignored) {
      CUDA_KERNEL_ASSERT_PRINTF(in_range, "torchfast cross_entropy: target %lld (row %lld) is out of bounds for %lld "
                                "classes and is not ignore_index=%lld", static_cast<long long>(t),
                                static_cast<long long>(row), static_cast<long long>(n),
                                static_cast<long long>(p.ignore_index));
    }
    int64_t head = aligned_head<N>(xr, n);
    T* dr = nullptr;
    if constexpr (kBwd) {
      dr = dx + row * dx_stride;
      // A vector of x and the vector of dx at the same j must both be aligned: else the row is scalar.
      if (aligned_head<N>(dr, n) != head) head = n;
    }
    A l;
    if constexpr (kFwd) {
      A xt = A(0);
      if (threadIdx.x == 0 && !ignored) {
        // Read before the barrier in block_merge: the in-place gradient sweep may overwrite it after.
        xt = in_range ? static_cast<A>(xr[t]) : std::numeric_limits<A>::quiet_NaN();
      }
      RowStats<A> st{-kInf, A(0), A(0), 0};
      const bool smooth = p.eps != A(0);
      auto acc = [&](int64_t, auto& v) {
        constexpr int K = std::extent_v<std::remove_reference_t<decltype(v)>>;
        A vm = -kInf;
        bool bad = false;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          v[k] = softcap(v[k], p);
          bad |= ::isnan(v[k]) || v[k] == kInf;
          vm = v[k] > vm ? v[k] : vm;
          if (smooth) st.total += v[k];
        }
        if (bad) {
          st.bad = 1;
          return;
        }
        if (vm == -kInf) return;  // every exp is 0; keeps an all -inf start from giving NaN
        if (vm > st.m) {
          st.s *= cuda::exp_op(st.m - vm);  // 0 when m was -inf
          st.m = vm;
        }
#pragma unroll
        for (int k = 0; k < K; ++k) st.s += cuda::exp_op(v[k] - st.m);
      };
      visit_row<N>(xr, n, head, acc);
      st = block_merge(st, scratch);
      // All -inf: -inf + log(0) = -inf, and the loss -inf - (-inf) is NaN, as F.cross_entropy gives.
      l = st.bad ? std::numeric_limits<A>::quiet_NaN() : st.m + log_(st.s);
      if (threadIdx.x == 0) {
        lse[row] = l;
        A v = A(0);
        if (!ignored) {
          v = l - p.one_minus_eps * softcap(xt, p);
          if (smooth) v -= p.eps * st.total / static_cast<A>(n);
          if (p.z != A(0)) v += p.z * l * l;
        }
        loss[row] = v;
      }
    } else {
      l = lse[row];
    }
    if constexpr (kBwd) {
      // Ignored rows: g = 0 without reading grad (for "mean" with every target ignored it is 1/0).
      const A g = ignored ? A(0) : grad[row * grad_stride];
      const A c1 = g * (A(1) + A(2) * p.z * l);  // multiplies p_j
      const A c0 = g * p.eps_v;                  // subtracted from every class
      const A c_t = g * p.one_minus_eps;         // subtracted from the target class
      const int64_t tt = ignored || !in_range ? -1 : t;
      auto write = [&](int64_t j, auto& v) {
        constexpr int K = std::extent_v<std::remove_reference_t<decltype(v)>>;
        A out[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const A s = softcap(v[k], p);
          A d = cuda::exp_op(s - l) * c1 - c0;
          if (j + k == tt) d -= c_t;
          if (p.cap > A(0)) {
            const A r = s * p.inv_cap;
            d *= A(1) - r * r;
          }
          out[k] = d;
        }
        cuda::store_vec<K>(dr + j, out);
      };
      visit_row<N>(xr, n, head, write);
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------------

// One launch of the row kernel over `rows` rows of n classes. lse is an output with fwd, an input
// without; loss is used only with fwd, grad / dx only with bwd. Per-row arrays hold one value per row
// (grad: one per grad_stride, 0 = the same value for every row), all in the math type.
struct RowsLaunch {
  const void* x;
  int64_t x_stride;
  const int64_t* target;
  int64_t rows, n;
  void* loss;
  void* lse;
  const void* grad;
  int64_t grad_stride;
  void* dx;
  int64_t dx_stride;
};

template <typename T, bool kFwd, bool kBwd>
void launch_rows(const RowsLaunch& a, const RowParams<at::opmath_type<T>>& p, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  constexpr int N = cuda::kVecElems<T>;
  const cuda::LaunchConfig cfg = cuda::row_launch(a.rows, a.n, N);
  ce_rows_kernel<N, T, kFwd, kBwd><<<cfg.grid, cfg.block, 0, stream>>>(
      static_cast<const T*>(a.x), a.x_stride, a.target, a.rows, a.n, p, static_cast<A*>(a.loss),
      static_cast<A*>(a.lse), static_cast<const A*>(a.grad), a.grad_stride, static_cast<T*>(a.dx), a.dx_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the row kernel on the current stream (the caller holds the device guard); rows > 0.
void run_rows(c10::ScalarType dtype, const CEOptions& o, const RowsLaunch& a, bool fwd, bool bwd) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "torchfast_cross_entropy_cuda", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    RowParams<A> p;
    p.ignore_index = o.ignore_index;
    p.eps = static_cast<A>(o.label_smoothing);
    p.one_minus_eps = static_cast<A>(1.0 - o.label_smoothing);
    p.eps_v = static_cast<A>(o.label_smoothing / static_cast<double>(a.n));
    p.z = static_cast<A>(o.z_loss);
    p.cap = static_cast<A>(o.softcap);
    p.inv_cap = o.softcap > 0.0 ? static_cast<A>(1.0 / o.softcap) : A(0);
    if (fwd && bwd) {
      launch_rows<T, true, true>(a, p, stream);
    } else if (fwd) {
      launch_rows<T, true, false>(a, p, stream);
    } else {
      launch_rows<T, false, true>(a, p, stream);
    }
  });
}

// Class indices as a flat int64 tensor (int32 targets are widened; a contiguous int64 one is used as is).
at::Tensor flat_target(const at::Tensor& target) { return target.reshape({-1}).to(at::kLong).contiguous(); }

// A per-row float tensor as a flat view and its stride, without materializing an expanded one (the
// gradient of .sum() / .mean() reaches the backward as a stride-0 expand).
std::pair<at::Tensor, int64_t> flat_rows(const at::Tensor& t) {
  at::Tensor f = t.reshape({-1});
  return {f, f.numel() > 1 ? f.stride(0) : 0};
}

const char* byte_offset(const void* p, int64_t elems, size_t elem_size) {
  return static_cast<const char*>(p) + elems * static_cast<int64_t>(elem_size);
}
char* byte_offset(void* p, int64_t elems, size_t elem_size) {
  return static_cast<char*>(p) + elems * static_cast<int64_t>(elem_size);
}

// ---- cross_entropy ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                      int64_t ignore_index, double label_smoothing, double z_loss,
                                                      std::optional<double> softcap) {
  constexpr const char* op = "cross_entropy";
  check_logits(logits, target, op);
  const CEOptions o = ce_options(op, ignore_index, label_smoothing, z_loss, softcap);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  auto opts = logits.options().dtype(ce_acc_dtype(logits));
  at::Tensor loss = at::empty(target.sizes(), opts), lse = at::empty(target.sizes(), opts);
  const int64_t rows = target.numel();
  if (rows == 0) return {loss, lse};
  const auto [x, rp] = as_rows(logits);
  const at::Tensor t = flat_target(target);
  RowsLaunch a{rp.ptr, rp.row_stride, t.const_data_ptr<int64_t>(), rows, logits.size(-1),
               loss.mutable_data_ptr(), lse.mutable_data_ptr(), nullptr, 0, nullptr, 0};
  run_rows(logits.scalar_type(), o, a, /*fwd=*/true, /*bwd=*/false);
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index,
                                       double label_smoothing, double z_loss, std::optional<double> softcap) {
  constexpr const char* op = "cross_entropy_backward";
  check_logits(logits, target, op);
  check_rows_arg(grad_loss, logits, op, "grad_loss", "logits");
  check_rows_arg(lse, logits, op, "lse", "logits");
  const CEOptions o = ce_options(op, ignore_index, label_smoothing, z_loss, softcap);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor dx = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = target.numel(), n = logits.size(-1);
  if (rows == 0) return dx;
  const auto [x, rp] = as_rows(logits);
  const at::Tensor t = flat_target(target);
  const at::Tensor l = lse.reshape({-1}).contiguous();
  const auto [g, g_stride] = flat_rows(grad_loss);
  RowsLaunch a{rp.ptr, rp.row_stride, t.const_data_ptr<int64_t>(), rows, n, nullptr,
               const_cast<void*>(l.const_data_ptr()), g.const_data_ptr(), g_stride, dx.mutable_data_ptr(), n};
  run_rows(logits.scalar_type(), o, a, /*fwd=*/false, /*bwd=*/true);
  return dx;
}

// ---- linear_cross_entropy ---------------------------------------------------------------------------
// As on CPU (cross_entropy_cpu.cpp): one [chunk, V] logits buffer reused for every chunk, filled by
// cuBLAS (mm_out / addmm_out); the row kernel writes loss and lse and, when gradients are wanted,
// d loss / d logits over the buffer in place; then grad_hidden[chunk] = dlogits @ weight,
// grad_weight += dlogits^T @ hidden[chunk] (weight's dtype: the first chunk writes it with mm, the
// others add with beta = 1, cuBLAS summing in fp32 inside; the CPU backend does the same), and
// grad_bias += column sums (fp32; fp64 for double). Everything stays on the stream: the "mean" scale
// 1 / count is a device tensor the kernel reads, so no host sync.

using OptTensor = std::optional<at::Tensor>;

using linear_ce::Grads;
using linear_ce::Inputs;

Inputs linear_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                     const OptTensor& bias, int64_t ignore_index, double label_smoothing, double z_loss,
                     const std::optional<double>& softcap, int64_t chunk_size, const char* op) {
  return linear_ce::inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                           op, [](const at::Tensor& t, int64_t) { return flat_target(t); });
}

// One pass over the chunks (the caller holds the device guard). With `fwd`, the row kernel writes loss
// and lse; with gradients wanted, `grad` (per row, stride grad_stride; 0 = one value) scales
// d loss / d logits, written over the chunk's logits, and the three gradient GEMMs accumulate.
void run_chunks(const Inputs& c, int64_t chunk, bool fwd, at::Tensor* loss, at::Tensor* lse,
                const at::Tensor* grad, int64_t grad_stride, Grads* g) {
  const bool want_grad = g != nullptr && g->any();
  if (c.rows == 0 || (!fwd && !want_grad)) return;
  chunk = std::min(chunk, c.rows);
  at::Tensor buf = at::empty({chunk, c.vocab}, c.h.options());
  const at::Tensor wt = c.w.t();
  const size_t acc_size = c10::elementSize(ce_acc_dtype(c.h));
  for (int64_t start = 0; start < c.rows; start += chunk) {
    const int64_t m = std::min(chunk, c.rows - start);
    at::Tensor hc = c.h.narrow(0, start, m);
    at::Tensor logits = buf.narrow(0, 0, m);
    if (c.b.has_value()) {
      at::addmm_out(logits, *c.b, hc, wt);
    } else {
      at::mm_out(logits, hc, wt);
    }
    RowsLaunch a{logits.const_data_ptr(), c.vocab, c.t.const_data_ptr<int64_t>() + start, m, c.vocab,
                 fwd ? byte_offset(loss->mutable_data_ptr(), start, acc_size) : nullptr,
                 byte_offset(lse->mutable_data_ptr(), start, acc_size),
                 want_grad ? byte_offset(grad->const_data_ptr(), start * grad_stride, acc_size) : nullptr,
                 grad_stride, want_grad ? logits.mutable_data_ptr() : nullptr, c.vocab};
    run_rows(c.h.scalar_type(), c.o, a, fwd, want_grad);
    if (!want_grad) continue;
    if (g->dh.defined()) {
      at::Tensor dh = g->dh.narrow(0, start, m);
      at::mm_out(dh, logits, c.w);
    }
    linear_ce::add_weight_bias_grads(g, logits, hc, /*first=*/start == 0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const OptTensor& bias,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, int64_t grad_mask) {
  constexpr const char* op = "linear_cross_entropy";
  const bool sums = ce_reduction_sums(std::string(reduction), op);
  Inputs c = linear_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                             chunk_size, op);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const auto acc = c.h.options().dtype(ce_acc_dtype(c.h));
  at::Tensor loss = at::empty({c.rows}, acc), lse = at::empty({c.rows}, acc);
  const bool mean = reduction == "mean";
  // d loss / d loss_row: 1 for "sum", 1 / count for "mean", as a device scalar (count = the targets
  // that are not ignore_index; 1 / 0 = inf only scales ignored rows, which the kernel gives 0 without
  // reading it).
  const at::Tensor count = mean ? c.t.ne(ignore_index).sum().to(acc.dtype()) : at::Tensor();
  const at::Tensor scale = mean ? count.reciprocal().reshape({1}) : at::ones({1}, acc);
  Grads g;
  if (sums) g = linear_ce::alloc_grads(c, grad_mask_bits(grad_mask, op));
  run_chunks(c, chunk_size, /*fwd=*/true, &loss, &lse, &scale, /*grad_stride=*/0, sums ? &g : nullptr);
  at::Tensor out_loss = sums ? (mean ? loss.sum().div(count) : loss.sum()) : loss.reshape(target.sizes());
  auto [dh, dw, db] = linear_ce::finish_grads(g, hidden, weight, bias);
  return {out_loss, lse.reshape(target.sizes()), dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const OptTensor& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, int64_t grad_mask) {
  constexpr const char* op = "linear_cross_entropy_backward";
  Inputs c = linear_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                             chunk_size, op);
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  check_rows_arg(grad_loss, hidden, op, "grad_loss", "hidden");
  check_rows_arg(lse, hidden, op, "lse", "hidden");
  at::Tensor l = lse.reshape({-1}).contiguous();
  const auto [gl, gl_stride] = flat_rows(grad_loss);
  Grads g = linear_ce::alloc_grads(c, grad_mask_bits(grad_mask, op));
  run_chunks(c, chunk_size, /*fwd=*/false, nullptr, &l, &gl, gl_stride, &g);
  return linear_ce::finish_grads(g, hidden, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
}

}  // namespace torchfast
