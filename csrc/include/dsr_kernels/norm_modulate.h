// Fused LayerNorm/RMSNorm + adaLN modulation + register insertion + token statistics.
//
// Forward, per token h of [registers ; x] (T = R + N tokens per sample):
//   y   = norm(h) * weight + bias          (weight, bias optional)
//   out = y * (1 + scale[b]) + shift[b]    (shift, scale optional)
// plus, from the same pass: residual = [registers ; x] (only with registers), the L2
// norm of h, its max |h_d| and sum h_d^4, and the mean / rstd saved for the backward.
//
// The CPU (cpu/norm_modulate.cpp) and CUDA (cuda/norm_modulate.cu) kernels share the
// argument struct below; norm_modulate.cpp validates, allocates and registers them with PyTorch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dsr_kernels {

enum class NormKind : int { LayerNorm = 0, RMSNorm = 1 };

// Rows of one sample that one chunk of the parameter-gradient reduction covers. Fixed
// (not derived from the thread count) so that the reduction order, and therefore the
// result, is the same on every machine.
constexpr int64_t kRowsPerChunk = 64;

inline int64_t chunks_per_sample(int64_t tokens) { return (tokens + kRowsPerChunk - 1) / kRowsPerChunk; }

// Inputs after validation. Tensors are contiguous; optional ones may be undefined.
// shift/scale/weight/bias are passed in the accumulation type (float, or double for
// double inputs) so that the kernels never convert them per element.
struct NormModulateArgs {
  at::Tensor x;          // [B, N, D]
  at::Tensor registers;  // [R, D] (shared) or [B, R, D], x's dtype
  at::Tensor shift;      // [B, D], accumulation type
  at::Tensor scale;      // [B, D], accumulation type
  at::Tensor weight;     // [D], accumulation type
  at::Tensor bias;       // [D], accumulation type
  int64_t B = 0, N = 0, D = 0, R = 0;
  bool shared_registers = false;
  NormKind kind = NormKind::LayerNorm;
  double eps = 1e-6;
  int64_t tokens() const { return R + N; }
};

// Outputs of the forward. residual, norms, moments are undefined when not requested;
// mean is undefined for RMSNorm. Statistics are in the accumulation type (float32, or
// float64 for float64 inputs).
struct NormModulateOutputs {
  at::Tensor out;       // [B, T, D], x's dtype
  at::Tensor residual;  // [B, T, D], x's dtype
  at::Tensor norms;     // [B, T]: ||h||_2
  at::Tensor moments;   // [B, T, 2]: max |h_d|, sum h_d^4
  at::Tensor mean;      // [B, T]
  at::Tensor rstd;      // [B, T]
};

// Gradients. dx [B, N, D] and dregisters [B, R, D] (accumulation type, per sample) are
// written per row; the parameter gradients as per-chunk partial sums
// [B, chunks_per_sample(T), D] (accumulation type), reduced by the caller.
struct NormModulateGrads {
  at::Tensor dx;
  at::Tensor dregisters;
  at::Tensor dshift_partial;
  at::Tensor dscale_partial;
  at::Tensor dweight_partial;
  at::Tensor dbias_partial;
};

void norm_modulate_fwd_cpu(const NormModulateArgs& args, NormModulateOutputs& outputs);
void norm_modulate_bwd_cpu(const NormModulateArgs& args, const at::Tensor& dout, const at::Tensor& dresidual,
                           const at::Tensor& mean, const at::Tensor& rstd, NormModulateGrads& grads);

#ifdef DSR_WITH_CUDA
void norm_modulate_fwd_cuda(const NormModulateArgs& args, NormModulateOutputs& outputs);
void norm_modulate_bwd_cuda(const NormModulateArgs& args, const at::Tensor& dout, const at::Tensor& dresidual,
                            const at::Tensor& mean, const at::Tensor& rstd, NormModulateGrads& grads);
#endif

}  // namespace dsr_kernels
