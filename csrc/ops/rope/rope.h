// Rotary position embedding (rope / rope_backward): the kernel parameters, shared by the per-ISA CPU
// kernels (rope_kernel.cpp) and the CUDA kernel (rope_cuda.cu), and the host code of both backends:
// argument checks, output allocation, and the description of each operand's rows.
//
// The math (torchfast/reference/rope.py): for a head vector x of width D and cos/sin rows of width R,
//   forward:   out[:R] = x[:R] * cos + rotate(x[:R]) * sin,     out[R:] = x[R:]
//   transpose: out[:R] = x[:R] * cos - rotate(x[:R] * sin),     out[R:] = x[R:]    (rope_backward)
// rotate-half pairs (i, i + R/2), interleaved pairs (2i, 2i + 1).
//
// cos/sin are broadcast to x as `cos.unsqueeze(unsqueeze_dim)`, never materialized: every leading
// dimension of x gets a cos/sin stride (0 where cos is broadcast), and the kernels walk the rows of x
// with an odometer over those dimensions. Dimensions that are contiguous for x, out and cos alike are
// merged first, so [B, H, T, D] with cos [B, 1, T, R] is walked as 3 dimensions and [B, T, H, D] with
// cos [B, T, 1, R] as 2.
#pragma once

#include <cstdint>

namespace torchfast::rope {

constexpr int kMaxDims = 8;  // leading dimensions after merging (x has at most kMaxDims + 1 dims)

// One tensor to rotate (q or k, or their gradients): rows of `dim` elements, the last dimension
// contiguous in x and out; row offsets (in elements) from the leading dimensions' strides.
struct Operand {
  const void* x;
  void* out;
  int64_t rows;
  int64_t dim;
  int nd;
  int64_t size[kMaxDims];
  int64_t x_stride[kMaxDims];
  int64_t out_stride[kMaxDims];
  int64_t cs_stride[kMaxDims];  // of cos and of sin (they share strides)
};

struct Params {
  Operand op[2];
  int n_ops;
  const void* cos;
  const void* sin;
  int64_t rot;  // R
  bool interleaved;
  bool transpose;
};

}  // namespace torchfast::rope

#ifndef TORCHFAST_ROPE_KERNEL_ONLY
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>

#include <torchfast/checks.h>
#include <torchfast/cpu_alloc.h>

#include <tuple>
#include <vector>

namespace torchfast::rope {

inline void check_cos_sin(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op,
                          const char* xn) {
  check_strided(cos, op, "cos");
  check_strided(sin, op, "sin");
  check_float(cos, op, "cos");
  check_same_device(x, cos, op, xn, "cos");
  check_same_device(x, sin, op, xn, "sin");
  check_same_dtype(cos, sin, op, "cos", "sin");
  check_same_shape(cos, sin, op, "cos", "sin");
  const auto xt = x.scalar_type(), ct = cos.scalar_type();
  const bool reduced = xt == at::kBFloat16 || xt == at::kHalf;
  TORCH_CHECK_TYPE(ct == xt || (reduced && ct == at::kFloat), "torchfast.", op, ": 'cos' and 'sin' have dtype ",
                   ct, " but '", xn, "' has dtype ", xt, "; they must have ", xn, "'s dtype",
                   reduced ? " or float32" : "");
}

// The position of cos's new dimension in cos.unsqueeze(unsqueeze_dim), which must come before its last
// dimension (the rotated features).
inline int64_t unsqueezed_position(const at::Tensor& cos, int64_t unsqueeze_dim, const char* op) {
  TORCH_CHECK(cos.dim() >= 1, "torchfast.", op, ": argument 'cos' is 0-dimensional; its last dimension holds ",
              "the R rotated features");
  const int64_t n = cos.dim() + 1;
  const int64_t p = unsqueeze_dim < 0 ? unsqueeze_dim + n : unsqueeze_dim;
  TORCH_CHECK_VALUE(p >= 0 && p <= cos.dim() - 1, "torchfast.", op, ": unsqueeze_dim=", unsqueeze_dim,
                    " is out of range for 'cos' of ", cos.dim(), " dimensions; cos.unsqueeze(unsqueeze_dim) must ",
                    "keep the features last, so it must be in [", -n, ", ", cos.dim() - 1, "]");
  return p;
}

// cos.unsqueeze(p) must broadcast to x's shape with R <= D features: checked, and x's leading shape.
inline void check_broadcast(const at::Tensor& x, const at::Tensor& cos_u, const char* op, const char* xn) {
  const int64_t r = cos_u.size(-1);
  TORCH_CHECK_VALUE(r % 2 == 0, "torchfast.", op, ": 'cos' has ", r, " features (its last dimension); the ",
                    "rotated features come in pairs, so it must be even");
  bool ok = x.dim() >= cos_u.dim() && x.size(-1) >= r;
  for (int64_t i = 2; ok && i <= cos_u.dim(); ++i) {
    const int64_t c = cos_u.size(-i);
    ok = c == 1 || c == x.size(-i);
  }
  TORCH_CHECK(ok, "torchfast.", op, ": 'cos' unsqueezed to ", cos_u.sizes(), " does not broadcast to '", xn,
              "' of shape ", x.sizes(),
              ": its leading dimensions must be 1 or equal to ", xn, "'s, and its last (", r,
              ", the rotated features) at most ", xn, "'s head dimension");
}

inline void check_pair(const at::Tensor& q, const at::Tensor& k, const char* op, const char* qn, const char* kn) {
  check_strided(q, op, qn);
  check_strided(k, op, kn);
  check_float(q, op, qn);
  check_float(k, op, kn);
  check_same_device(q, k, op, qn, kn);
  check_same_dtype(q, k, op, qn, kn);
}

// Describes x (rows of x.size(-1) elements with stride-1 last dimension), out (same shape) and cos_u
// (broadcastable to x) as an Operand: size-1 dimensions dropped, contiguous neighbours merged.
inline Operand describe(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos_u, const char* op) {
  Operand o{};
  o.x = x.const_data_ptr();
  o.out = out.mutable_data_ptr();
  o.dim = x.size(-1);
  o.rows = x.numel() / o.dim;
  const int64_t lead = x.dim() - 1, off = x.dim() - cos_u.dim();
  std::vector<int64_t> size, xs, os, cs;
  for (int64_t d = 0; d < lead; ++d) {
    if (x.size(d) == 1) continue;
    const int64_t cd = d - off;
    const int64_t c = cd >= 0 && cos_u.size(cd) != 1 ? cos_u.stride(cd) : 0;
    if (!size.empty() && xs.back() == x.stride(d) * x.size(d) && os.back() == out.stride(d) * x.size(d) &&
        cs.back() == c * x.size(d)) {
      size.back() *= x.size(d);
      xs.back() = x.stride(d);
      os.back() = out.stride(d);
      cs.back() = c;
      continue;
    }
    size.push_back(x.size(d));
    xs.push_back(x.stride(d));
    os.push_back(out.stride(d));
    cs.push_back(c);
  }
  if (size.empty()) {
    size = {1};
    xs = os = cs = {0};
  }
  TORCH_CHECK(size.size() <= static_cast<size_t>(kMaxDims), "torchfast.", op, ": the leading dimensions of ",
              "the inputs do not merge into at most ", kMaxDims, " strided dimensions (", size.size(),
              "); make them contiguous first");
  o.nd = static_cast<int>(size.size());
  for (int i = 0; i < o.nd; ++i) {
    o.size[i] = size[i];
    o.x_stride[i] = xs[i];
    o.out_stride[i] = os[i];
    o.cs_stride[i] = cs[i];
  }
  return o;
}

// rope (transpose=false) or rope_backward (transpose=true) of the pair (a, b): their names in the
// schema are an/bn. B (a backend) provides `static void run(ScalarType x, ScalarType cs, const Params&)`
// and a device guard type B::Guard(c10::Device).
template <typename B>
std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cos,
                                              const at::Tensor& sin, int64_t unsqueeze_dim, bool interleaved,
                                              bool transpose, const char* op, const char* an, const char* bn) {
  check_pair(a, b, op, an, bn);
  check_cos_sin(a, cos, sin, op, an);
  const int64_t p = unsqueezed_position(cos, unsqueeze_dim, op);
  const typename B::Guard guard(a.device());
  // cos and sin are read with one set of strides and a stride-1 last dimension.
  at::Tensor c = cos, s = sin;
  if ((c.size(-1) > 1 && c.stride(-1) != 1) || (s.size(-1) > 1 && s.stride(-1) != 1) || c.strides() != s.strides()) {
    c = c.contiguous();
    s = s.contiguous();
  }
  const at::Tensor cos_u = c.unsqueeze(p);
  check_broadcast(a, cos_u, op, an);
  check_broadcast(b, cos_u, op, bn);

  Params prm{};
  prm.cos = c.const_data_ptr();
  prm.sin = s.const_data_ptr();
  prm.rot = c.size(-1);
  prm.interleaved = interleaved;
  prm.transpose = transpose;
  const at::Tensor* ins[2] = {&a, &b};
  at::Tensor outs[2], xs[2], work[2];
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& x = *ins[i];
    outs[i] = hinted(at::empty_like(x));
    if (x.numel() == 0) continue;
    // The kernels need a stride-1 last dimension; other layouts go through contiguous copies.
    const bool unit = x.size(-1) == 1 || (x.stride(-1) == 1 && outs[i].stride(-1) == 1);
    xs[i] = unit ? x : x.contiguous();
    work[i] = unit ? outs[i] : at::empty_like(xs[i]);
    prm.op[prm.n_ops++] = describe(xs[i], work[i], cos_u, op);
  }
  if (prm.n_ops > 0) B::run(a.scalar_type(), c.scalar_type(), prm);
  for (int i = 0; i < 2; ++i) {
    if (work[i].defined() && !work[i].is_same(outs[i])) outs[i].copy_(work[i]);
  }
  return {outs[0], outs[1]};
}

// The op entry points, registered by rope_cpu.cpp and rope_cuda.cu.
template <typename B>
struct RopeOps {
  static std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin, int64_t unsqueeze_dim, bool interleaved) {
    return rope_apply<B>(q, k, cos, sin, unsqueeze_dim, interleaved, false, "rope", "q", "k");
  }

  static std::tuple<at::Tensor, at::Tensor> rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          int64_t unsqueeze_dim, bool interleaved) {
    return rope_apply<B>(grad_q, grad_k, cos, sin, unsqueeze_dim, interleaved, true, "rope_backward", "grad_q",
                         "grad_k");
  }
};

}  // namespace torchfast::rope
#endif  // TORCHFAST_ROPE_KERNEL_ONLY
