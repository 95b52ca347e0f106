// swiglu / geglu, separate and packed: argument checks, output allocation and layout, shared by the CPU
// and CUDA op files. B (a backend) provides
//   static void fwd(ScalarType, int act, int64_t rows, int64_t cols, RowPtr gate, RowPtr up, RowPtrMut out);
//   static void bwd(ScalarType, int act, int64_t rows, int64_t cols, RowPtr grad_out, RowPtr gate,
//                   RowPtr up, RowPtrMut grad_gate, RowPtrMut grad_up);
// which run the kernel on row views (row_ptr.h) of n = rows * cols > 0 elements, and a device guard type
// B::Guard(c10::Device) held while the op allocates and launches. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <torchfast/act_names.h>
#include <torchfast/checks.h>
#include <torchfast/cpu_alloc.h>
#include <torchfast/rows.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace torchfast::glu {

inline int64_t last_dim(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }

inline void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn) {
  check_strided(a, op, an);
  check_strided(b, op, bn);
  check_float(a, op, an);
  check_float(b, op, bn);
  check_same_device(a, b, op, an, bn);
  check_same_dtype(a, b, op, an, bn);
  check_same_shape(a, b, op, an, bn);
}

// Runs the kernel on same-shaped operands, writing into outs (allocated by empty_like(gate), so all of
// the same layout). Inputs already in that layout are walked as one flat row; inputs that are row
// views (e.g. the halves of x.chunk(2, -1)) are read in place when the outputs are contiguous;
// otherwise inputs are copied into the outputs' layout (laid_out_like) and walked flat.
template <size_t NI, size_t NO, typename Kernel>
void run_same_shape(const std::array<at::Tensor, NI>& ins, const std::array<at::Tensor, NO>& outs,
                    const Kernel& kernel) {
  const at::Tensor& out = outs[0];
  if (out.numel() == 0) return;
  bool flat = true;
  for (const auto& t : ins) flat = flat && t.strides() == out.strides() && t.is_non_overlapping_and_dense();
  bool rows_ok = !flat && out.is_contiguous();
  for (const auto& t : ins) rows_ok = rows_ok && row_stride(t).has_value();
  std::array<RowPtr, NI> in_ptrs;
  std::array<RowPtrMut, NO> out_ptrs;
  std::array<at::Tensor, NI> keep;
  int64_t rows = 1, cols = out.numel();
  if (rows_ok) {
    rows = num_rows(out);
    cols = last_dim(out);
    for (size_t i = 0; i < NI; ++i) in_ptrs[i] = RowPtr{ins[i].const_data_ptr(), *row_stride(ins[i])};
    for (size_t i = 0; i < NO; ++i) out_ptrs[i] = RowPtrMut{outs[i].mutable_data_ptr(), cols};
  } else {
    for (size_t i = 0; i < NI; ++i) {
      keep[i] = laid_out_like(ins[i], out);
      in_ptrs[i] = RowPtr{keep[i].const_data_ptr(), 0};
    }
    for (size_t i = 0; i < NO; ++i) out_ptrs[i] = RowPtrMut{outs[i].mutable_data_ptr(), 0};
  }
  kernel(rows, cols, in_ptrs, out_ptrs);
}

template <typename B>
at::Tensor glu_forward(const at::Tensor& gate, const at::Tensor& up, ActCode act, const char* op) {
  check_pair(gate, up, op, "gate", "up");
  const typename B::Guard guard(gate.device());
  at::Tensor out = hinted(at::empty_like(gate));
  run_same_shape<2, 1>({gate, up}, {out}, [&](int64_t rows, int64_t cols, auto in, auto o) {
    B::fwd(gate.scalar_type(), static_cast<int>(act), rows, cols, in[0], in[1], o[0]);
  });
  return out;
}

template <typename B>
std::tuple<at::Tensor, at::Tensor> glu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                const at::Tensor& up, ActCode act, const char* op) {
  check_pair(gate, up, op, "gate", "up");
  check_strided(grad_out, op, "grad_out");
  check_same_device(grad_out, gate, op, "grad_out", "gate");
  check_same_dtype(grad_out, gate, op, "grad_out", "gate");
  check_same_shape(grad_out, gate, op, "grad_out", "gate");
  const typename B::Guard guard(gate.device());
  at::Tensor grad_gate = hinted(at::empty_like(gate));
  at::Tensor grad_up = hinted(at::empty_like(gate));
  run_same_shape<3, 2>({grad_out, gate, up}, {grad_gate, grad_up},
                       [&](int64_t rows, int64_t cols, auto in, auto o) {
                         B::bwd(gate.scalar_type(), static_cast<int>(act), rows, cols,
                                                         in[0], in[1], in[2], o[0], o[1]);
                       });
  return {grad_gate, grad_up};
}

// The width H of each half of a packed [..., 2H] tensor.
inline int64_t half_width(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1, "torchfast.", op, ": argument 'x' is 0-dimensional; a packed input holds the ",
              "gate and up halves side by side along its last dimension");
  TORCH_CHECK_VALUE(x.size(-1) % 2 == 0, "torchfast.", op, ": argument 'x' has an odd last dimension (",
                    x.size(-1), "); a packed input holds the gate and up halves side by side, so its width ",
                    "must be even");
  return x.size(-1) / 2;
}

// The gate and up halves of a packed row view: the same rows, up starting H elements later.
inline std::pair<RowPtr, RowPtr> halves(const RowPtr& x, int64_t h, int64_t element_size) {
  return {x, RowPtr{static_cast<const char*>(x.ptr) + h * element_size, x.row_stride}};
}

template <typename B>
at::Tensor glu_packed_forward(const at::Tensor& x, ActCode act, const char* op) {
  check_strided(x, op, "x");
  check_float(x, op, "x");
  const int64_t h = half_width(x, op);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = h;
  const typename B::Guard guard(x.device());
  at::Tensor out = hinted(at::empty(shape, x.options()));
  if (out.numel() > 0) {
    auto [xk, xr] = as_rows(x);
    auto [g, u] = halves(xr, h, x.element_size());
    B::fwd(x.scalar_type(), static_cast<int>(act), num_rows(out), h, g, u, RowPtrMut{out.mutable_data_ptr(), h});
  }
  return out;
}

template <typename B>
at::Tensor glu_packed_backward(const at::Tensor& grad_out, const at::Tensor& x, ActCode act, const char* op) {
  check_strided(grad_out, op, "grad_out");
  check_strided(x, op, "x");
  check_float(x, op, "x");
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  const int64_t h = half_width(x, op);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = h;
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(shape), "torchfast.", op, ": 'grad_out' has shape ",
              grad_out.sizes(), " but the output of a packed 'x' of shape ", x.sizes(), " has shape ",
              c10::IntArrayRef(shape));
  const typename B::Guard guard(x.device());
  at::Tensor grad_x = hinted(at::empty(x.sizes(), x.options()));
  if (grad_x.numel() > 0) {
    auto [gk, gr] = as_rows(grad_out);
    auto [xk, xr] = as_rows(x);
    auto [g, u] = halves(xr, h, x.element_size());
    char* base = static_cast<char*>(grad_x.mutable_data_ptr());
    B::bwd(x.scalar_type(), static_cast<int>(act), num_rows(grad_out), h, gr, g, u, RowPtrMut{base, 2 * h},
           RowPtrMut{base + h * x.element_size(), 2 * h});
  }
  return grad_x;
}

// The op entry points, registered by glu_cpu.cpp and glu_cuda.cu.
template <typename B>
struct GluOps {
  static at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
    return glu_forward<B>(gate, up, ActCode::Swish, "swiglu");
  }

  static std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                            const at::Tensor& up) {
    return glu_backward<B>(grad_out, gate, up, ActCode::Swish, "swiglu_backward");
  }

  static at::Tensor swiglu_packed(const at::Tensor& x) {
    return glu_packed_forward<B>(x, ActCode::Swish, "swiglu_packed");
  }

  static at::Tensor swiglu_packed_backward(const at::Tensor& grad_out, const at::Tensor& x) {
    return glu_packed_backward<B>(grad_out, x, ActCode::Swish, "swiglu_packed_backward");
  }

  static at::Tensor geglu(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
    return glu_forward<B>(gate, up, parse_gelu_approximate(std::string(approximate), "geglu"), "geglu");
  }

  static std::tuple<at::Tensor, at::Tensor> geglu_backward(const at::Tensor& grad_out, const at::Tensor& gate,
                                                           const at::Tensor& up, c10::string_view approximate) {
    constexpr const char* op = "geglu_backward";
    return glu_backward<B>(grad_out, gate, up, parse_gelu_approximate(std::string(approximate), op), op);
  }

  static at::Tensor geglu_packed(const at::Tensor& x, c10::string_view approximate) {
    constexpr const char* op = "geglu_packed";
    return glu_packed_forward<B>(x, parse_gelu_approximate(std::string(approximate), op), op);
  }

  static at::Tensor geglu_packed_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                          c10::string_view approximate) {
    constexpr const char* op = "geglu_packed_backward";
    return glu_packed_backward<B>(grad_out, x, parse_gelu_approximate(std::string(approximate), op), op);
  }
};

}  // namespace torchfast::glu
