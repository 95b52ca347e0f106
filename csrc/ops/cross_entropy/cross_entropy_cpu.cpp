// cross_entropy and linear_cross_entropy on CPU: argument checks, outputs, the call into the per-ISA
// row kernels (cross_entropy_kernel.cpp) and, for the linear form, the loop over chunks of tokens.
//
// linear_cross_entropy never holds the [tokens, V] logits: each chunk's logits go into one buffer of
// chunk x V, reused for every chunk. For reduction "mean"/"sum" the gradients are computed during the
// forward (they depend only on the chunk's rows and the reduction's scale): the row kernel turns the
// buffer into d loss / d logits in place, and three GEMMs (ATen's: MKL or oneDNN) follow:
//   grad_hidden[chunk] = dlogits @ weight,  grad_weight += dlogits^T @ hidden[chunk],  grad_bias += sum(dlogits)
// so a training step costs the three GEMMs of the unfused F.linear + F.cross_entropy, not four. The
// buffer holds [chunk, V] (row kernels) in float32/float64 and [V, chunk] (column kernels) in
// bfloat16/float16, whichever layout the GEMMs ran faster with (column_logits). In float32
// the logits and grad_hidden GEMMs go through oneDNN where torchfast.ops.linear found it the faster
// library (cpu::onednn_matmul(): AMD CPUs by default, TORCHFAST_CPU_MATMUL), the weight-gradient GEMM
// through ATen's addmm_ (it accumulates in place; oneDNN was not faster for it).
// grad_weight accumulates in weight's dtype with beta = 1 (the GEMM adds in fp32 inside and rounds once
// per chunk); grad_bias accumulates in fp32.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include <torchfast/cpu_alloc.h>
#include <torchfast/cpu_matmul.h>
#include <torchfast/rows.h>

#include "cross_entropy.h"
#include "cross_entropy_linear.h"

namespace torchfast {
namespace {

using OptTensor = std::optional<at::Tensor>;

// int64, contiguous, and every class index in [0, V) or ignore_index (checked here, before any kernel
// runs, like torch's nll_loss: "Target 7 is out of bounds.").
at::Tensor checked_target(const at::Tensor& target, int64_t n, int64_t ignore_index, const char* op) {
  at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0, rows = t.numel(); i < rows; ++i) {
    TORCH_CHECK_INDEX(p[i] == ignore_index || (p[i] >= 0 && p[i] < n), "torchfast.", op, ": target ", p[i],
                      " at position ", i, " is out of bounds for ", n, " classes (and is not ignore_index=",
                      ignore_index, ")");
  }
  return t;
}

// The logits as rows with a contiguous last dimension and one row stride (a copy only when needed).
std::pair<at::Tensor, int64_t> rows_of(const at::Tensor& x) {
  if (auto rs = row_stride(x)) return {x, *rs};
  at::Tensor c = x.contiguous();
  return {c, c.size(-1)};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double z_loss,
                                                     std::optional<double> softcap) {
  constexpr const char* op = "cross_entropy";
  check_logits(logits, target, op);
  const CEOptions o = ce_options(op, ignore_index, label_smoothing, z_loss, softcap);
  const int64_t n = logits.size(-1);
  const at::Tensor t = checked_target(target, n, ignore_index, op);
  auto opts = logits.options().dtype(ce_acc_dtype(logits));
  at::Tensor loss = at::empty(target.sizes(), opts), lse = at::empty(target.sizes(), opts);
  const int64_t rows = t.numel();
  if (rows > 0) {
    auto [x, stride] = rows_of(logits);
    TORCHFAST_CPU_DISPATCH(ce_fwd)(x.scalar_type(), x.const_data_ptr(), stride, t.const_data_ptr<int64_t>(), rows, n, o,
                                   loss.mutable_data_ptr(), lse.mutable_data_ptr());
  }
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
                                      double z_loss, std::optional<double> softcap) {
  constexpr const char* op = "cross_entropy_backward";
  check_logits(logits, target, op);
  check_rows_arg(grad_loss, logits, op, "grad_loss", "logits");
  check_rows_arg(lse, logits, op, "lse", "logits");
  const CEOptions o = ce_options(op, ignore_index, label_smoothing, z_loss, softcap);
  const int64_t n = logits.size(-1);
  const at::Tensor t = checked_target(target, n, ignore_index, op);
  at::Tensor dx = hinted(at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous)));
  const int64_t rows = t.numel();
  if (rows > 0) {
    auto [x, stride] = rows_of(logits);
    const at::Tensor g = grad_loss.contiguous(), l = lse.contiguous();
    TORCHFAST_CPU_DISPATCH(ce_bwd)(x.scalar_type(), x.const_data_ptr(), stride, t.const_data_ptr<int64_t>(),
                                   l.const_data_ptr(), g.const_data_ptr(), 1, rows, n, o, dx.mutable_data_ptr(), n);
  }
  return dx;
}

// ---- linear_cross_entropy -------------------------------------------------------------------------

using linear_ce::Grads;
using linear_ce::Inputs;

Inputs linear_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                     const OptTensor& bias, int64_t ignore_index, double label_smoothing, double z_loss,
                     const std::optional<double>& softcap, int64_t chunk_size, const char* op) {
  return linear_ce::inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                           op, [&](const at::Tensor& t, int64_t vocab) {
                             return checked_target(t, vocab, ignore_index, op).reshape({-1});
                           });
}

// mkldnn::_linear_pointwise, the oneDNN GEMM that torchfast.linear and inductor's CPU backend use; looked
// up once (nullptr in a torch built without oneDNN).
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

// Below about 2^24 multiply-adds oneDNN's per-call cost outweighs its faster kernel (torchfast/ops/linear.py).
bool use_onednn(const at::Tensor& x, int64_t m, int64_t k, int64_t n) {
  return x.scalar_type() == at::kFloat && cpu::onednn_matmul() && m * k * n >= (int64_t{1} << 24) &&
         onednn_linear_op() != nullptr;
}

// x @ w^T (+ b) through oneDNN, into a new tensor (the op has no out= form); w may be a transposed view.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& b) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(b.has_value() ? c10::IValue(*b) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// Whether a chunk's logits are kept as [V, chunk] (one column per token) instead of [chunk, V]. The
// three GEMMs then read and write the other layout: logits^T = W @ h_c^T, grad_hidden = (dlogits^T)^T @ W,
// grad_weight += dlogits^T @ h_c. In bfloat16 that made the step's GEMMs 7% faster (the grad_hidden GEMM
// 106 -> 91 ms per 128-token chunk at V=32000, H=2048, one AVX-512 core: oneDNN's bf16 kernel reads a
// column-major dlogits better), in float16 1.65x; in float32 (MKL or oneDNN) and float64 the row layout
// was 10-20% faster. TORCHFAST_CE_LOGITS_LAYOUT=rows|columns overrides the choice (to test and measure).
bool column_logits(const at::Tensor& h) {
  const char* v = std::getenv("TORCHFAST_CE_LOGITS_LAYOUT");
  if (v != nullptr && *v != '\0') {
    const std::string s(v);
    TORCH_CHECK_VALUE(s == "rows" || s == "columns", "torchfast.linear_cross_entropy: environment variable ",
                      "TORCHFAST_CE_LOGITS_LAYOUT must be 'rows' or 'columns'; got '", s, "'");
    return s == "columns";
  }
  return h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf;
}

// One pass over the chunks. Each chunk's logits go into `buf`; with `fwd`, the row (or column) kernel
// writes loss and lse; with gradients wanted, `grad` (per row, stride grad_stride) scales d loss / d logits, written over
// the logits in place, and the three gradient GEMMs accumulate.
void run_chunks(const Inputs& c, int64_t chunk, bool fwd, at::Tensor* loss, at::Tensor* lse,
                const at::Tensor* grad, int64_t grad_stride, Grads* g) {
  const bool want_grad = g != nullptr && g->any();
  if (c.rows == 0 || (!fwd && !want_grad)) return;
  chunk = std::min(chunk, c.rows);
  const int64_t hidden = c.h.size(1);
  const bool cols = column_logits(c.h);
  // oneDNN writes each chunk's logits into a new tensor (freed before the next chunk's); ATen's GEMM
  // writes into one reused buffer.
  const bool onednn_logits = !cols && use_onednn(c.h, chunk, hidden, c.vocab);
  const bool onednn_dh = !cols && use_onednn(c.h, chunk, c.vocab, hidden);
  at::Tensor buf = onednn_logits ? at::Tensor() : hinted(at::empty({chunk * c.vocab}, c.h.options()));
  const at::Tensor wt = c.w.t();
  const auto dtype = c.h.scalar_type();
  const size_t acc_size = c10::elementSize(ce_acc_dtype(c.h));
  for (int64_t start = 0; start < c.rows; start += chunk) {
    const int64_t m = std::min(chunk, c.rows - start);
    at::Tensor hc = c.h.narrow(0, start, m);
    // logits: [m, V] in either layout (a transposed view of the contiguous [V, m] in the column layout).
    at::Tensor logits;
    if (onednn_logits) {
      logits = onednn_linear(hc, c.w, c.b);
    } else if (cols) {
      at::Tensor lt = buf.narrow(0, 0, c.vocab * m).view({c.vocab, m});
      if (c.b.has_value()) {
        at::addmm_out(lt, c.b->unsqueeze(1), c.w, hc.t());
      } else {
        at::mm_out(lt, c.w, hc.t());
      }
      logits = lt.t();
    } else {
      logits = buf.narrow(0, 0, m * c.vocab).view({m, c.vocab});
      if (c.b.has_value()) {
        at::addmm_out(logits, *c.b, hc, wt);
      } else {
        at::mm_out(logits, hc, wt);
      }
    }
    const int64_t* tp = c.t.const_data_ptr<int64_t>() + start;
    char* loss_p = fwd ? static_cast<char*>(loss->mutable_data_ptr()) + start * acc_size : nullptr;
    char* lse_p = fwd ? static_cast<char*>(lse->mutable_data_ptr()) + start * acc_size : nullptr;
    if (fwd && cols) {
      TORCHFAST_CPU_DISPATCH(ce_fwd_cols)(dtype, logits.const_data_ptr(), m, tp, m, c.vocab, c.o, loss_p, lse_p);
    } else if (fwd) {
      TORCHFAST_CPU_DISPATCH(ce_fwd)(dtype, logits.const_data_ptr(), c.vocab, tp, m, c.vocab, c.o, loss_p, lse_p);
    }
    if (!want_grad) continue;
    const char* gp = static_cast<const char*>(grad->const_data_ptr()) + start * grad_stride * acc_size;
    const char* lp = static_cast<const char*>(lse->const_data_ptr()) + start * acc_size;
    if (cols) {
      TORCHFAST_CPU_DISPATCH(ce_bwd_cols)(dtype, logits.const_data_ptr(), m, tp, lp, gp, grad_stride, m, c.vocab,
                                          c.o, logits.mutable_data_ptr());
    } else {
      TORCHFAST_CPU_DISPATCH(ce_bwd)(dtype, logits.const_data_ptr(), c.vocab, tp, lp, gp, grad_stride, m, c.vocab,
                                     c.o, logits.mutable_data_ptr(), c.vocab);
    }
    at::Tensor dh = g->dh.defined() ? g->dh.narrow(0, start, m) : at::Tensor();
    if (cols) {
      // grad_weight += dlogits^T @ h_c with dlogits^T the contiguous [V, m] buffer: given h_c as a
      // transposed view of a contiguous [H, m] copy, so that neither GEMM operand is a plain row-major
      // matrix. Where ATen's bf16 GEMM is not oneDNN's (CPUs without AVX-512, or ONEDNN_MAX_CPU_ISA=AVX2)
      // that case falls to a slow loop: 1549 -> 226 ms at V=8000, H=1024, 128 tokens (AVX2 forced on a
      // Zen 4); on AVX-512 both run at the same speed. The copy goes into this chunk's rows of grad_hidden,
      // written only afterwards, so it costs no memory (a buffer when grad_hidden is not wanted).
      at::Tensor hc_w = hc;
      if (g->dw.defined()) {
        at::Tensor hct = dh.defined() ? dh.view({-1}).view({hidden, m}) : at::empty({hidden, m}, c.h.options());
        hc_w = hct.copy_(hc.t()).t();
      }
      linear_ce::add_weight_bias_grads(g, logits, hc_w, /*first=*/start == 0);
      if (dh.defined()) at::mm_out(dh, logits, c.w);
      continue;
    }
    if (dh.defined()) {
      if (onednn_dh) {
        dh.copy_(onednn_linear(logits, wt, std::nullopt));
      } else {
        at::mm_out(dh, logits, c.w);
      }
    }
    linear_ce::add_weight_bias_grads(g, logits, hc, /*first=*/start == 0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const OptTensor& bias,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, int64_t grad_mask) {
  constexpr const char* op = "linear_cross_entropy";
  const bool sums = ce_reduction_sums(std::string(reduction), op);
  Inputs c = linear_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                             chunk_size, op);
  const auto acc = c.h.options().dtype(ce_acc_dtype(c.h));
  at::Tensor loss = at::empty({c.rows}, acc), lse = at::empty({c.rows}, acc);
  // d loss / d loss_row: 1 for "sum", 1 / count for "mean" (0 / 0 = NaN only scales ignored rows, whose
  // gradient the kernel sets to 0 without reading it).
  int64_t count = 0;
  const int64_t* tp = c.t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.rows; ++i) count += tp[i] != ignore_index;
  const bool mean = reduction == "mean";
  at::Tensor scale = at::empty({1}, acc).fill_(mean ? 1.0 / static_cast<double>(count) : 1.0);
  Grads g;
  if (sums) g = linear_ce::alloc_grads(c, grad_mask_bits(grad_mask, op));
  run_chunks(c, chunk_size, /*fwd=*/true, &loss, &lse, &scale, /*grad_stride=*/0, sums ? &g : nullptr);
  at::Tensor out_loss = sums ? (mean ? loss.sum().div(static_cast<double>(count)) : loss.sum()) : loss.reshape(target.sizes());
  auto [dh, dw, db] = linear_ce::finish_grads(g, hidden, weight, bias);
  return {out_loss, lse.reshape(target.sizes()), dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const OptTensor& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, int64_t chunk_size, int64_t grad_mask) {
  constexpr const char* op = "linear_cross_entropy_backward";
  Inputs c = linear_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                             chunk_size, op);
  check_rows_arg(grad_loss, hidden, op, "grad_loss", "hidden");
  check_rows_arg(lse, hidden, op, "lse", "hidden");
  at::Tensor l = lse.reshape({-1}).contiguous(), gl = grad_loss.reshape({-1}).contiguous();
  Grads g = linear_ce::alloc_grads(c, grad_mask_bits(grad_mask, op));
  run_chunks(c, chunk_size, /*fwd=*/false, nullptr, &l, &gl, /*grad_stride=*/1, &g);
  return linear_ce::finish_grads(g, hidden, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
}

}  // namespace torchfast
