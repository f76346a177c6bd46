// Register attention on the CPU with its statistics in the same pass (backend "cpu" of
// dsr_kernels.attention; the definition is dsr_kernels/reference/attention.py).
//
// Forward, per (batch, head, block of BM queries), in parallel: the logits of the block
// against the R register keys and the Nk token keys (two GEMMs into one [BM, R + Nk] row
// block that stays in L2; no concatenated K/V), the masks, the exact row max and lse
// (with the sink), p = exp(s - max), out = P V (two GEMMs), and while each row is in
// cache its entropy (lse - sum p s), register share and the block's column sums of p
// (the key mass), reduced over the query blocks in a fixed order afterwards. Backward,
// per (batch, K/V head; its query heads in order): FlashAttention-2's algorithm (delta = rowsum(dO * O), P recomputed
// from the saved lse); register gradients of shared [H, R, D] registers and the sink's
// are summed over the batch in a fixed order. No atomics: the results are bitwise the
// same for any thread count. float32 only: the Python launcher converts fp16 / bf16
// (fp32 accumulation).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace dsr_kernels {

// Which token keys a query sees (dsr_kernels/attention_call.py's Causal): key j is visible
// to query i iff j <= i (kTopLeft) or j <= i + nk - nq (kBottomRight, per sequence).
enum class Causal : int64_t { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

// How rotary tables pair channels (dsr_kernels/rope.py's RopeStyle): (2i, 2i + 1) or (i, i + D / 2).
enum class RopeStyle : int64_t { kNone = 0, kInterleaved = 1, kHalf = 2 };

// One attention call: the fields of dsr_kernels/attention_call.py's AttentionCall, in its
// order (kAttentionArgsSchema below; a test compares the two).
//
// Batched: q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] with Hk dividing H (query
// head h reads K/V head h / (H / Hk)) (float32, any strides with a contiguous last dim and
// rows that do not overlap); rk [H, R, D] or [B, H, R, D], rv the same with Dv; sinks [H]
// float32; key_mask [B, Nk] bool; attn_mask [B, H, Nq, Nk] (any strides, zero strides for
// broadcast dims) bool or floating; rope_cos, rope_sin [N, D] float32 tables
// (self-attention, Nq = Nk = N): q and the token keys are rotated as their rows are loaded
// (never the registers), and the backward rotates dq and dk back.
//
// Packed sequences (cu_seqlens_q given; flash-attn's varlen layout): q [1, H, Tq, D], k [1,
// Hk, Tk, D], v [1, Hk, Tk, Dv] (views of packed [T, H, D] tensors); sequence s owns query
// rows cu_seqlens_q[s] .. [s + 1] and key rows cu_seqlens_k[s] .. [s + 1] (int32 / int64, S
// + 1 offsets from 0 to the total); rk, rv [H, R, D] shared or [S, H, R, D] per sequence; no
// masks or rope. Tasks are (sequence, head, query block): no loop over sequences, and no
// work for padding. max_seqlen_* are not read (the offsets say it).
struct AttentionArgs {
  at::Tensor q, k, v;
  std::optional<at::Tensor> rk, rv, sinks, key_mask, attn_mask, cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  std::optional<at::Tensor> rope_cos, rope_sin;
  RopeStyle rope_style = RopeStyle::kNone;
  Causal causal = Causal::kNone;
  int64_t num_prefix_tokens = 0;
  double scale = 1.0;
  bool return_stats = false;
  bool key_mass_in_backward = false;  // with return_stats: the forward leaves key_mass to the backward
};

// The op schema's argument list of AttentionArgs ("Tensor q, Tensor k, ..., bool return_stats").
extern const char* const kAttentionArgsSchema;

// What the forward writes: out [B, H, Nq, Dv] float32 (any strides with a contiguous last
// dim; packed: [1, H, Tq, Dv]), lse [B, H, Nq] (packed: [H, Tq]) and, with return_stats,
// entropy, register_share (lse's shape) and key_mass [B, H, R + Nk] (packed: [S, H, R +
// max_s Nk_s], zeros past each sequence's keys).
struct AttentionOutputs {
  at::Tensor out, lse, entropy, register_share, key_mass;
};

// What the backward writes: dq, dk, dv (q's / k's / v's shapes, float32, any strides with a
// contiguous last dim) and, when given, drk, drv (rk's shape; shared registers summed over
// the batch or the sequences in order), dsinks ([H]) and key_mass (the forward's key_mass
// shape: the column sums of the probabilities the backward recomputes, per (sequence, head)
// over the query blocks in order; for calls whose forward left it to the backward).
struct AttentionGrads {
  at::Tensor dq, dk, dv;
  std::optional<at::Tensor> drk, drv, dsinks, key_mass;
};

// The forward of the call, and its gradients from the forward's out and lse.
void attention_fwd_cpu(const AttentionArgs& args, const AttentionOutputs& outputs);
void attention_bwd_cpu(const AttentionArgs& args, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                       const AttentionGrads& grads);

// The instruction set of the row operations: "avx512", "avx2" or "default".
const char* attention_cpu_capability();

}  // namespace dsr_kernels
