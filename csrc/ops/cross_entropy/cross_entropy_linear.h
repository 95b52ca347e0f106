// linear_cross_entropy's host code shared by the CPU and CUDA backends: the inputs as the chunk loop
// wants them, the gradient buffers, and the weight/bias gradient accumulation of one chunk. Each backend
// keeps its own chunk loop (the row kernels and the logits / grad_hidden GEMMs differ) and its own target
// handling (the CPU checks the class indices on the host; CUDA never syncs for them).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <optional>
#include <tuple>

#include "cross_entropy.h"

namespace torchfast::linear_ce {

using OptTensor = std::optional<at::Tensor>;

struct Inputs {
  at::Tensor h, w, t;  // hidden as [N, H] contiguous, weight [V, H] contiguous, target [N] int64
  OptTensor b;
  int64_t rows, vocab;
  CEOptions o;
};

// Checks every argument, then flattens them; `flat_target(target, vocab)` gives target as [N] int64.
template <class FlatTarget>
Inputs inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const OptTensor& bias,
              int64_t ignore_index, double label_smoothing, double z_loss, const std::optional<double>& softcap,
              int64_t chunk_size, const char* op, FlatTarget flat_target) {
  check_linear_args(hidden, weight, target, bias, chunk_size, op);
  Inputs c;
  c.o = ce_options(op, ignore_index, label_smoothing, z_loss, softcap);
  c.vocab = weight.size(0);
  c.h = hidden.reshape({-1, hidden.size(-1)}).contiguous();
  c.w = weight.contiguous();
  c.b = bias.has_value() ? OptTensor(bias->contiguous()) : std::nullopt;
  c.t = flat_target(target, c.vocab);
  c.rows = c.t.numel();
  return c;
}

struct Grads {
  at::Tensor dh, dw, db_acc;  // undefined when not asked for; db accumulates in the math type

  bool any() const { return dh.defined() || dw.defined() || db_acc.defined(); }
};

inline Grads alloc_grads(const Inputs& c, const std::array<bool, 3>& mask) {
  Grads g;
  if (mask[0]) g.dh = at::empty_like(c.h);
  if (mask[1]) g.dw = c.rows > 0 ? at::empty_like(c.w) : at::zeros_like(c.w);  // the chunk loop writes it
  if (mask[2] && c.b.has_value()) g.db_acc = at::zeros({c.vocab}, c.h.options().dtype(ce_acc_dtype(c.h)));
  return g;
}

// grad_weight += dlogits^T @ hidden[chunk] (the first chunk writes it: no zero fill, no beta = 1 pass;
// weight's dtype, the GEMM summing in fp32 inside), grad_bias += the column sums of dlogits (math type).
inline void add_weight_bias_grads(Grads* g, const at::Tensor& dlogits, const at::Tensor& hc, bool first) {
  if (g->dw.defined()) {
    if (first) {
      at::mm_out(g->dw, dlogits.t(), hc);
    } else {
      g->dw.addmm_(dlogits.t(), hc);
    }
  }
  if (g->db_acc.defined()) g->db_acc.add_(at::sum(dlogits, {0}, false, g->db_acc.scalar_type()));
}

inline at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The op's three gradient outputs: hidden's shape, or an empty tensor for a gradient not computed.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_grads(const Grads& g, const at::Tensor& hidden,
                                                                   const at::Tensor& weight, const OptTensor& bias) {
  at::Tensor dh = g.dh.defined() ? g.dh.reshape(hidden.sizes()) : empty_grad(hidden);
  at::Tensor dw = g.dw.defined() ? g.dw : empty_grad(weight);
  at::Tensor db = g.db_acc.defined() ? g.db_acc.to(bias->scalar_type()) : empty_grad(bias.value_or(hidden));
  return {dh, dw, db};
}

}  // namespace torchfast::linear_ce
