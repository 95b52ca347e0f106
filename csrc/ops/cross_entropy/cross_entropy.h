// cross_entropy and linear_cross_entropy: the options every kernel takes, the argument checks shared
// by the CPU and CUDA host code (so both backends refuse the same inputs with the same words), and the
// per-ISA CPU row kernels' declarations. Math: torchfast/reference/cross_entropy.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>

#include <torchfast/checks.h>
#include <torchfast/cpu_isa.h>

namespace torchfast {

// The loss options of one call. softcap == 0 means no softcap (the schema's None).
struct CEOptions {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;
};

inline CEOptions ce_options(const char* op, int64_t ignore_index, double label_smoothing, double z_loss,
                            const std::optional<double>& softcap) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "torchfast.", op,
                    ": label_smoothing must be in [0, 1]; got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss), "torchfast.", op,
                    ": z_loss must be a finite number >= 0; got ", z_loss);
  TORCH_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)), "torchfast.", op,
                    ": softcap must be None or a finite number > 0; got ", softcap.value_or(0.0));
  return {ignore_index, label_smoothing, z_loss, softcap.value_or(0.0)};
}

// The math type of the per-row outputs (loss, lse) and of the incoming per-row gradients.
inline at::ScalarType ce_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_target(const at::Tensor& target, const at::Tensor& input, const char* op,
                         const char* input_arg) {
  check_strided(target, op, "target");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, "torchfast.", op,
                   ": argument 'target' has dtype ", target.scalar_type(),
                   "; expected class indices of dtype int64 (or int32)");
  check_same_device(input, target, op, input_arg, "target");
  TORCH_CHECK(input.dim() >= 1, "torchfast.", op, ": argument '", input_arg,
              "' must have at least one dimension (the last one holds the classes); got a 0-d tensor");
  TORCH_CHECK(target.sizes() == input.sizes().slice(0, input.dim() - 1), "torchfast.", op,
              ": argument 'target' has shape ", target.sizes(), " but '", input_arg, "' has shape ",
              input.sizes(), "; target must have the shape of ", input_arg, " without its last dimension (",
              input.sizes().slice(0, input.dim() - 1), ")");
}

inline void check_logits(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_strided(logits, op, "logits");
  check_float(logits, op, "logits");
  check_target(target, logits, op, "logits");
  TORCH_CHECK(logits.size(-1) > 0, "torchfast.", op, ": argument 'logits' has shape ", logits.sizes(),
              ": its last dimension (the classes) is empty");
}

// A per-row tensor handed back to a backward op (lse, grad_loss): target's shape, the math type.
inline void check_rows_arg(const at::Tensor& t, const at::Tensor& input, const char* op, const char* arg,
                           const char* input_arg) {
  check_strided(t, op, arg);
  check_same_device(input, t, op, input_arg, arg);
  TORCH_CHECK(t.sizes() == input.sizes().slice(0, input.dim() - 1), "torchfast.", op, ": argument '", arg,
              "' has shape ", t.sizes(), "; expected ", input.sizes().slice(0, input.dim() - 1));
  TORCH_CHECK_TYPE(t.scalar_type() == ce_acc_dtype(input), "torchfast.", op, ": argument '", arg,
                   "' has dtype ", t.scalar_type(), "; expected ", ce_acc_dtype(input), " for '", input_arg,
                   "' of dtype ", input.scalar_type());
}

inline void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                              const std::optional<at::Tensor>& bias, int64_t chunk_size, const char* op) {
  check_strided(hidden, op, "hidden");
  check_float(hidden, op, "hidden");
  check_target(target, hidden, op, "hidden");
  check_strided(weight, op, "weight");
  check_same_device(hidden, weight, op, "hidden", "weight");
  TORCH_CHECK(weight.dim() == 2, "torchfast.", op, ": argument 'weight' must be 2-D [vocab, hidden]; got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(-1), "torchfast.", op, ": argument 'weight' has shape ",
              weight.sizes(), " but 'hidden' has shape ", hidden.sizes(), "; weight.shape[1] must equal ",
              "hidden.shape[-1] (", hidden.size(-1), ")");
  TORCH_CHECK(weight.size(0) > 0, "torchfast.", op, ": argument 'weight' has shape ", weight.sizes(),
              ": the vocabulary (its first dimension) is empty");
  check_same_dtype(weight, hidden, op, "weight", "hidden");
  if (bias.has_value()) {
    check_strided(*bias, op, "bias");
    check_same_device(hidden, *bias, op, "hidden", "bias");
    check_same_dtype(*bias, hidden, op, "bias", "hidden");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "torchfast.", op,
                ": argument 'bias' has shape ", bias->sizes(), "; expected [", weight.size(0), "] (weight.shape[0])");
  }
  TORCH_CHECK_VALUE(chunk_size > 0, "torchfast.", op, ": chunk_size must be > 0; got ", chunk_size);
}

// grad_mask of the linear ops: bit 1 hidden, bit 2 weight, bit 4 bias.
inline std::array<bool, 3> grad_mask_bits(int64_t mask, const char* op) {
  TORCH_CHECK_VALUE(mask >= 0 && mask <= 7, "torchfast.", op, ": grad_mask must be in [0, 7] (bits 1, 2, 4: ",
                    "hidden, weight, bias); got ", mask);
  return {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
}

inline int64_t grad_mask_int(const std::array<bool, 3>& m) { return (m[0] ? 1 : 0) | (m[1] ? 2 : 0) | (m[2] ? 4 : 0); }

inline bool ce_reduction_sums(const std::string& reduction, const char* op) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", "torchfast.", op,
                    ": reduction must be 'mean', 'sum' or 'none'; got '", reduction, "'");
  return reduction != "none";
}

}  // namespace torchfast

// Per-ISA CPU row kernels (cross_entropy_kernel.cpp). Rows start `x_stride` elements apart; target is
// int64, one per row. Per-row outputs and gradients are in the math type (double for double logits,
// float otherwise).
//   ce_fwd: loss[i], lse[i].
//   ce_bwd: dx[i, :] = d loss_i / d x_i scaled by grad[i * grad_stride] (grad_stride 0: one value for all
//           rows); dx may be x itself (in place: each element is read before it is written).
//   ce_fwd_cols / ce_bwd_cols: the same for `cols` tokens stored column-major, element (class j, token i)
//           at x[j * ld + i] (dx too, with the same ld), as linear_cross_entropy's bf16/fp16 chunks are.
TORCHFAST_DECLARE_CPU_KERNEL(void, ce_fwd, c10::ScalarType, const void*, int64_t, const int64_t*, int64_t, int64_t,
                             const torchfast::CEOptions&, void*, void*)
TORCHFAST_DECLARE_CPU_KERNEL(void, ce_bwd, c10::ScalarType, const void*, int64_t, const int64_t*, const void*,
                             const void*, int64_t, int64_t, int64_t, const torchfast::CEOptions&, void*, int64_t)
TORCHFAST_DECLARE_CPU_KERNEL(void, ce_fwd_cols, c10::ScalarType, const void*, int64_t, const int64_t*, int64_t,
                             int64_t, const torchfast::CEOptions&, void*, void*)
TORCHFAST_DECLARE_CPU_KERNEL(void, ce_bwd_cols, c10::ScalarType, const void*, int64_t, const int64_t*, const void*,
                             const void*, int64_t, int64_t, int64_t, const torchfast::CEOptions&, void*)
