// MLP activation with test-time registers (Jiang et al. 2025, "Vision Transformers Don't
// Need Trained Registers"), fused: out = gelu(h) except at the K selected "register
// neuron" columns, where the patch rows are replaced (zero / mean / only outliers) and
// the test-time register rows receive the neuron's signed max over all tokens.
//
// h is the fc1 output, [B, T, F], T = prefix + patches + registers. The per-(image b,
// selected neuron k) column values -- the register rows' value, the patch rows' fill /
// threshold -- need a reduction over all T tokens of that one column:
//   CUDA: two stages, both reading h: the column values from the K columns (B x K
//     blocks), then one pass over h writing gelu with the selected columns overwritten;
//   CPU: one pass over h that writes gelu and copies each row's K selected activations
//     into a compact [B, T, K] buffer while the row is in cache (clearing them in the
//     patch rows for "zero"), then the column values from that buffer, then the register
//     rows' (and for "mean" / "only_outliers" the patch rows') selected columns.
// The definition is dsr_kernels/reference/ttr_activation.py; ttr_activation.cpp validates and
// registers the op (dsr_kernels::ttr_activation_fwd).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dsr_kernels {

enum class PatchValues : int { Zero = 0, Mean = 1, OnlyOutliers = 2, Same = 3 };
enum class RegisterValue : int { SignedMax = 0, Max = 1, LayerSignedMax = 2 };

// "mean": the mean of the lowest int(0.75 P) (at least 1) patch activations, as released.
inline int64_t bottom_mean_count(int64_t patches) {
  const int64_t n = (patches * 3) / 4;
  return n < 1 ? 1 : n;
}

struct TtrActivationArgs {
  at::Tensor h;        // [B, T, F], contiguous, float / double / half / bfloat16
  at::Tensor neurons;  // [K] int64, contiguous, distinct, in [0, F), on h's device
  int64_t B = 0, T = 0, F = 0, K = 0;
  int64_t prefix = 0;     // rows [0, prefix) are never modified (CLS, trained registers)
  int64_t registers = 1;  // rows [T - registers, T) are the test-time registers
  PatchValues patch_values = PatchValues::Zero;
  RegisterValue register_value = RegisterValue::SignedMax;
  bool tanh = false;  // GELU's tanh approximation instead of erf
  int64_t patch_end() const { return T - registers; }
};

// Stage 1's result, [B, K] each in the accumulation type (float, double for double h):
// the value of the register rows, and the patch rows' fill value and threshold
// (only_outliers replaces a patch activation a by fill where a > thresh).
struct TtrColumnValues {
  at::Tensor reg, fill, thresh;
};

// Writes out and fills values (allocated [B, K] by the caller).
void ttr_activation_cpu(const TtrActivationArgs& args, TtrColumnValues& values, at::Tensor& out);

#ifdef DSR_WITH_CUDA
void ttr_column_values_cuda(const TtrActivationArgs& args, TtrColumnValues& values);
void ttr_activation_fwd_cuda(const TtrActivationArgs& args, const TtrColumnValues& values, at::Tensor& out);
#endif

}  // namespace dsr_kernels
