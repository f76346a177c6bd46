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

// q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] with Hk dividing H (query head h
// reads K/V head h / (H / Hk)) (float32, any strides with a contiguous last dim);
// rk [H, R, D] or [B, H, R, D], rv the same with Dv; sinks [H] float32; key_mask [B, Nk] bool; attn_mask
// [B, H, Nq, Nk] (any strides, zero strides for broadcast dims) bool or floating;
// causal_offset: token key j is visible to query i iff j <= i + offset; rope_cos, rope_sin
// [N, D] float32 tables (self-attention, Nq = Nk = N) and rope_style 1 (interleaved pairs) or
// 2 (half pairs): q and the token keys are rotated as their rows are loaded (never the
// registers), and the backward rotates dq and dk back. Writes out
// [B, H, Nq, Dv] float32 (any strides with a contiguous last dim), lse [B, H, Nq] and,
// with return_stats, entropy, register_share [B, H, Nq] and key_mass [B, H, R + Nk].
void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                       const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
                       const std::optional<at::Tensor>& attn_mask, int64_t num_prefix_tokens, double scale,
                       std::optional<int64_t> causal_offset, bool return_stats, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& register_share,
                       const at::Tensor& key_mass, const std::optional<at::Tensor>& rope_cos = std::nullopt,
                       const std::optional<at::Tensor>& rope_sin = std::nullopt, int64_t rope_style = 0);

// Gradients of the forward above, written into dq, dk, dv (q's / k's shapes, float32, any
// strides with a contiguous last dim), drk, drv (rk's shape) and dsinks ([H]) when given.
void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                       const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
                       const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse,
                       double scale, std::optional<int64_t> causal_offset, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv, const std::optional<at::Tensor>& drk,
                       const std::optional<at::Tensor>& drv, const std::optional<at::Tensor>& dsinks,
                       const std::optional<at::Tensor>& rope_cos = std::nullopt,
                       const std::optional<at::Tensor>& rope_sin = std::nullopt, int64_t rope_style = 0);

// Packed variable-length sequences (flash-attn's varlen layout): q [1, H, Tq, D], k [1, Hk,
// Tk, D], v [1, Hk, Tk, Dv] (views of packed [T, H, D] tensors); sequence s owns query rows
// cu_seqlens_q[s] .. [s + 1] and key rows cu_seqlens_k[s] .. [s + 1] (int32 / int64, S + 1
// offsets from 0 to the total); causal: bottom-right aligned in each sequence. rk, rv
// [H, R, D] shared by the sequences or [S, H, R, D] per sequence. Writes out [1, H, Tq, Dv],
// lse [H, Tq] and, with return_stats, entropy, register_share [H, Tq] and key_mass
// [S, H, R + max_s Nk_s] (zeros past each sequence's keys). Tasks are (sequence, head,
// query block): no Python loop over sequences, and no work for padding.
void attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                              const std::optional<at::Tensor>& sinks, int64_t num_prefix_tokens, double scale,
                              bool causal, bool return_stats, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& entropy, const at::Tensor& register_share, const at::Tensor& key_mass);

// Gradients of the varlen forward (as attention_bwd_cpu; shared registers and the sinks
// are summed over the sequences in order).
void attention_varlen_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                              const std::optional<at::Tensor>& sinks, const at::Tensor& out, const at::Tensor& lse,
                              double scale, bool causal, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv, const std::optional<at::Tensor>& drk,
                              const std::optional<at::Tensor>& drv, const std::optional<at::Tensor>& dsinks);

// The instruction set of the row operations: "avx512", "avx2" or "default".
const char* attention_cpu_capability();

}  // namespace dsr_kernels
