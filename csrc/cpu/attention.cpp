// Register attention with its statistics in one pass, and its backward, on the CPU.
// See csrc/include/dsr_kernels/attention.h for the algorithm; the definition is
// dsr_kernels/reference/attention.py. GEMMs go through ATen's CPU BLAS (MKL / OpenBLAS,
// one thread inside the parallel region), the row operations through the vector code of
// attention_vec.h compiled for SSE, AVX2 and AVX-512 and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "dsr_kernels/attention.h"
#include "dsr_kernels/cpu_capability.h"

namespace dsr_kernels {
namespace {

#if defined(__GNUC__)
#define DSR_VEC_NS attn_vec_default
#define DSR_VEC_BYTES 16
#include "attention_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DSR_VEC_NS attn_vec_avx2
#define DSR_VEC_BYTES 32
#include "attention_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#define DSR_VEC_NS attn_vec_avx512
#define DSR_VEC_BYTES 64
#include "attention_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#endif
#else
#error "csrc/cpu/attention.cpp needs GCC or Clang vector extensions"
#endif

// The row operations of one instruction set.
struct RowOps {
  float (*row_max)(const float*, int64_t);
  void (*exp_row)(float*, int64_t, float, bool, float*, float*);
  float (*row_sum)(const float*, int64_t);
  void (*scale_row)(float*, int64_t, float);
  void (*add_row)(float*, const float*, int64_t);
  void (*softmax_grad_row)(const float*, float*, int64_t, float);
  const char* name;
};

#define DSR_ROW_OPS(ns, label)                                                                                  \
  RowOps {                                                                                                      \
    ns::row_max, ns::exp_row, ns::row_sum, ns::scale_row, ns::add_row, ns::softmax_grad_row, label             \
  }

RowOps pick_row_ops() {
  switch (cpu_isa()) {  // csrc/cpu/cpu_capability.cpp: what the processor has, capped by DSR_CPU_CAPABILITY
#if defined(__x86_64__)
    case CpuIsa::Avx512:
      return DSR_ROW_OPS(attn_vec_avx512, "avx512");
    case CpuIsa::Avx2:
      return DSR_ROW_OPS(attn_vec_avx2, "avx2");
#endif
    default:
      return DSR_ROW_OPS(attn_vec_default, "default");
  }
}

const RowOps& ops() {
  static const RowOps o = pick_row_ops();
  return o;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

}  // namespace
}  // namespace dsr_kernels

#include "blas.h"

namespace dsr_kernels {
namespace {

// Everything a task needs to read one (sequence, head): base pointers, row strides and the
// sequences. Batch mode: sequence s is batch entry s (B sequences of Nq queries and Nk
// keys). Varlen mode (cu_seqlens given): q, k, v are [1, H, Tq / Tk, D] views of packed
// [T, H, D] tensors, and sequence s owns query rows cu_q[s] .. cu_q[s + 1] and key rows
// cu_k[s] .. cu_k[s + 1]; per-sample registers are then per sequence.
struct Operands {
  int64_t B = 0, H = 0, Hk = 0, G = 1, Nq = 0, Nk = 0, D = 0, Dv = 0, R = 0;
  int64_t S = 0;                                // sequences
  int64_t max_nq = 0, max_nk = 0;               // the longest sequence's query / key count
  std::vector<int64_t> cu_q, cu_k;              // varlen offsets (S + 1 each), empty in batch mode
  const float *q = nullptr, *k = nullptr, *v = nullptr, *rk = nullptr, *rv = nullptr, *sinks = nullptr;
  int64_t sq[3]{}, sk[3]{}, sv[3]{}, srk[3]{}, srv[3]{};  // strides of dims b, h, n (elements)
  const bool* key_mask = nullptr;                          // [B, Nk] contiguous (batch mode)
  at::Tensor attn_mask;                                    // [B, H, Nq, Nk] (strided), or undefined
  Causal causal = Causal::kNone;
  float scale = 1.0f;
  // Rotary tables [N, D] (float32, contiguous) applied to q and the token keys as their
  // rows are loaded; rope 1: interleaved pairs (2i, 2i + 1), 2: half pairs (i, i + D / 2).
  const float *cos = nullptr, *sin = nullptr;
  int rope = 0;

  bool varlen() const { return !cu_q.empty(); }
  int64_t b(int64_t s) const { return varlen() ? 0 : s; }  // the batch index of sequence s
  int64_t qoff(int64_t s) const { return varlen() ? cu_q[s] : 0; }
  int64_t koff(int64_t s) const { return varlen() ? cu_k[s] : 0; }
  int64_t nq(int64_t s) const { return varlen() ? cu_q[s + 1] - cu_q[s] : Nq; }
  int64_t nk(int64_t s) const { return varlen() ? cu_k[s + 1] - cu_k[s] : Nk; }
  // Token key j is visible to query i of sequence s iff j <= i + offset (nullopt: all are).
  std::optional<int64_t> causal_offset(int64_t s) const {
    if (causal == Causal::kNone) return std::nullopt;
    return causal == Causal::kTopLeft ? 0 : nk(s) - nq(s);
  }
  const float* q_row(int64_t s, int64_t h, int64_t i) const {
    return q + b(s) * sq[0] + h * sq[1] + (qoff(s) + i) * sq[2];
  }
  const float* k_rows(int64_t s, int64_t h) const { return k + b(s) * sk[0] + (h / G) * sk[1] + koff(s) * sk[2]; }
  const float* v_rows(int64_t s, int64_t h) const { return v + b(s) * sv[0] + (h / G) * sv[1] + koff(s) * sv[2]; }
  const float* rk_rows(int64_t s, int64_t h) const { return rk + s * srk[0] + h * srk[1]; }
  const float* rv_rows(int64_t s, int64_t h) const { return rv + s * srv[0] + h * srv[1]; }
};

void strides3(const at::Tensor& t, int64_t* s) {  // [B, H, N, D] -> (b, h, n); [H, R, D] -> (0, h, n)
  if (t.dim() == 4) {
    s[0] = t.stride(0), s[1] = t.stride(1), s[2] = t.stride(2);
  } else {
    s[0] = 0, s[1] = t.stride(0), s[2] = t.stride(1);
  }
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim_lo, int64_t dim_hi) {
  TORCH_CHECK(t.device().is_cpu(), "attention (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "attention (cpu): ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= dim_lo && t.dim() <= dim_hi, "attention (cpu): ", name, " has ", t.dim(),
              " dims, expected ", dim_lo == dim_hi ? std::to_string(dim_lo) : "3 or 4");
  TORCH_CHECK(t.numel() == 0 || t.size(-1) == 1 || t.stride(-1) == 1, "attention (cpu): ", name,
              " must have a contiguous last dim, got strides ", t.strides());  // (a last dim of 1: any stride)
  // Rows are handed to BLAS with their stride as the leading dimension: it must not be
  // below the row length (an expanded stride 0 or the overlapping rows of unfold).
  TORCH_CHECK(t.numel() == 0 || t.size(-2) <= 1 || t.stride(-2) >= t.size(-1), "attention (cpu): ", name,
              " must have rows that do not overlap (row stride >= ", t.size(-1), "), got strides ", t.strides(),
              " for shape ", t.sizes(), ": pass .contiguous()");
}

inline int64_t rope_partner(int64_t d, int64_t D, int rope) {
  return rope == 1 ? (d ^ 1) : (d < D / 2 ? d + D / 2 : d - D / 2);
}
inline float rope_sign(int64_t d, int64_t D, int rope) { return (rope == 1 ? d % 2 == 0 : d < D / 2) ? -1.0f : 1.0f; }

// dst[r] = rope(src[r]) for n rows whose table rows start at row0:
// rope(x)[d] = x[d] cos[d] + sign[d] x[partner(d)] sin[d] (dsr_kernels/rope.py).
void rope_rows(const Operands& o, const float* src, int64_t ld_src, int64_t n, int64_t row0, float* dst,
               int64_t ld_dst) {
  const int64_t D = o.D;
  for (int64_t r = 0; r < n; ++r) {
    const float* x = src + r * ld_src;
    const float* c = o.cos + (row0 + r) * D;
    const float* sn = o.sin + (row0 + r) * D;
    float* y = dst + r * ld_dst;
    for (int64_t d = 0; d < D; ++d) {
      y[d] = x[d] * c[d] + rope_sign(d, D, o.rope) * x[rope_partner(d, D, o.rope)] * sn[d];
    }
  }
}

// g[r] <- rope^T(g[r]) in place (the gradient of the unrotated rows):
// g'[e] = g[e] cos[e] + sign[p(e)] g[p(e)] sin[p(e)], p the (involutive) partner map.
void rope_rows_transpose(const Operands& o, float* g, int64_t ld, int64_t n, int64_t row0, float* tmp) {
  const int64_t D = o.D;
  for (int64_t r = 0; r < n; ++r) {
    float* x = g + r * ld;
    std::copy(x, x + D, tmp);
    const float* c = o.cos + (row0 + r) * D;
    const float* sn = o.sin + (row0 + r) * D;
    for (int64_t e = 0; e < D; ++e) {
      const int64_t p = rope_partner(e, D, o.rope);
      x[e] = tmp[e] * c[e] + rope_sign(p, D, o.rope) * tmp[p] * sn[p];
    }
  }
}

std::vector<int64_t> offsets(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.device().is_cpu() && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong) &&
                  cu.dim() == 1 && cu.numel() >= 2,
              "attention (cpu): ", name, " must be a 1-D int32 / int64 CPU tensor of S + 1 >= 2 offsets, got ",
              cu.sizes(), " ", cu.scalar_type());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  std::vector<int64_t> v(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(v.front() == 0 && v.back() == total, "attention (cpu): ", name, " must run from 0 to ", total,
              ", got ", v.front(), " .. ", v.back());
  for (size_t i = 1; i < v.size(); ++i) {
    TORCH_CHECK(v[i] >= v[i - 1], "attention (cpu): ", name, " must not decrease, got ", v[i - 1], " then ", v[i]);
  }
  return v;
}

Operands make_operands(const AttentionArgs& a, at::Tensor& key_mask_holder) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v;
  const std::optional<at::Tensor>&rk = a.rk, &rv = a.rv, &sinks = a.sinks, &key_mask = a.key_mask;
  const std::optional<at::Tensor>&attn_mask = a.attn_mask, &rope_cos = a.rope_cos, &rope_sin = a.rope_sin;
  check_f32(q, "q", 4, 4);
  check_f32(k, "k", 4, 4);
  check_f32(v, "v", 4, 4);
  Operands o;
  o.B = q.size(0), o.H = q.size(1), o.Nq = q.size(2), o.D = q.size(3), o.Nk = k.size(2);
  o.Hk = k.size(1), o.Dv = v.size(3);
  const bool varlen = a.cu_seqlens_q.has_value();
  TORCH_CHECK(o.B > 0 && o.H > 0 && o.Hk > 0 && o.D > 0 && o.Dv > 0 && (varlen || (o.Nq > 0 && o.Nk > 0)),
              "attention (cpu): empty inputs, q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(k.size(0) == o.B && o.H % o.Hk == 0 && k.size(3) == o.D,
              "attention (cpu): k must be [B, Hk, Nk, D] with Hk dividing H, matching q ", q.sizes(), ", got ",
              k.sizes());
  o.G = o.H / o.Hk;
  TORCH_CHECK(v.size(0) == o.B && v.size(1) == o.Hk && v.size(2) == o.Nk, "attention (cpu): v must be [B, Hk, Nk, Dv]",
              " matching k ", k.sizes(), ", got ", v.sizes());
  if (varlen) {
    TORCH_CHECK(o.B == 1, "attention (cpu): varlen q, k, v must be [1, H, T, D] views of packed [T, H, D] tensors");
    TORCH_CHECK(a.cu_seqlens_k.has_value(), "attention (cpu): cu_seqlens_q and cu_seqlens_k go together");
    o.cu_q = offsets(*a.cu_seqlens_q, "cu_seqlens_q", o.Nq);
    o.cu_k = offsets(*a.cu_seqlens_k, "cu_seqlens_k", o.Nk);
    TORCH_CHECK(o.cu_q.size() == o.cu_k.size(), "attention (cpu): cu_seqlens_q and cu_seqlens_k must have one length, ",
                "got ", o.cu_q.size(), " and ", o.cu_k.size());
    TORCH_CHECK(!key_mask.has_value() && !attn_mask.has_value(),
                "attention (cpu): varlen takes no key_mask or attn_mask");
    o.S = static_cast<int64_t>(o.cu_q.size()) - 1;
  } else {
    o.S = o.B;
  }
  for (int64_t s = 0; s < o.S; ++s) o.max_nq = std::max(o.max_nq, o.nq(s)), o.max_nk = std::max(o.max_nk, o.nk(s));
  o.q = q.data_ptr<float>(), o.k = k.data_ptr<float>(), o.v = v.data_ptr<float>();
  strides3(q, o.sq), strides3(k, o.sk), strides3(v, o.sv);
  TORCH_CHECK(rk.has_value() == rv.has_value(), "attention (cpu): rk and rv must be given together");
  if (rk.has_value()) {
    check_f32(*rk, "rk", 3, 4);
    check_f32(*rv, "rv", 3, 4);
    const bool shared = rk->dim() == 3;
    TORCH_CHECK((shared && rk->size(0) == o.H && rk->size(2) == o.D) ||
                    (!shared && rk->size(0) == o.S && rk->size(1) == o.H && rk->size(3) == o.D),
                "attention (cpu): rk must be [H, R, D] or [", varlen ? "S" : "B", ", H, R, D] for q ", q.sizes(),
                ", got ", rk->sizes());
    TORCH_CHECK(rv->dim() == rk->dim() &&
                    rv->sizes().slice(0, rk->dim() - 1) == rk->sizes().slice(0, rk->dim() - 1) && rv->size(-1) == o.Dv,
                "attention (cpu): rv must be rk's shape with v's head dim ", o.Dv, ", got rk ", rk->sizes(), " rv ",
                rv->sizes());
    o.R = rk->size(-2);
    o.rk = rk->data_ptr<float>(), o.rv = rv->data_ptr<float>();
    strides3(*rk, o.srk), strides3(*rv, o.srv);
  }
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->dim() == 1 && sinks->size(0) == o.H &&
                    sinks->is_contiguous() && sinks->device().is_cpu(),
                "attention (cpu): sinks must be a contiguous float32 CPU tensor [H = ", o.H, "], got ",
                sinks->sizes(), " ", sinks->scalar_type());
    o.sinks = sinks->data_ptr<float>();
  }
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == o.B &&
                    key_mask->size(1) == o.Nk && key_mask->device().is_cpu(),
                "attention (cpu): key_mask must be a bool CPU tensor [B, Nk] = [", o.B, ", ", o.Nk, "], got ",
                key_mask->sizes(), " ", key_mask->scalar_type());
    key_mask_holder = key_mask->contiguous();
    o.key_mask = key_mask_holder.data_ptr<bool>();
  }
  if (attn_mask.has_value()) {
    TORCH_CHECK(attn_mask->device().is_cpu(), "attention (cpu): attn_mask must be a CPU tensor");
    TORCH_CHECK(attn_mask->dim() == 4 && attn_mask->size(0) == o.B && attn_mask->size(1) == o.H &&
                    attn_mask->size(2) == o.Nq && attn_mask->size(3) == o.Nk,
                "attention (cpu): attn_mask must be expanded to [B, H, Nq, Nk] = [", o.B, ", ", o.H, ", ", o.Nq,
                ", ", o.Nk, "], got ", attn_mask->sizes());
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || at::isFloatingType(attn_mask->scalar_type()),
                "attention (cpu): attn_mask must be bool or floating, got ", attn_mask->scalar_type());
    o.attn_mask = *attn_mask;
  }
  TORCH_CHECK(a.causal == Causal::kNone || a.causal == Causal::kTopLeft || a.causal == Causal::kBottomRight,
              "attention (cpu): causal must be 0 (none), 1 (top-left) or 2 (bottom-right), got ",
              static_cast<int64_t>(a.causal));
  o.causal = a.causal;
  o.scale = static_cast<float>(a.scale);
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), "attention (cpu): rope_cos and rope_sin go together");
  if (rope_cos.has_value()) {
    TORCH_CHECK(!varlen, "attention (cpu): rope tables are for batch mode (one position per query / key row)");
    TORCH_CHECK(a.rope_style == RopeStyle::kInterleaved || a.rope_style == RopeStyle::kHalf,
                "attention (cpu): rope_style must be 1 (interleaved) or 2 (half), got ",
                static_cast<int64_t>(a.rope_style));
    TORCH_CHECK(o.Nq == o.Nk && o.D % 2 == 0,
                "attention (cpu): rope needs self-attention (Nq == Nk) and an even D, got Nq ", o.Nq, ", Nk ", o.Nk,
                ", D ", o.D);
    for (const at::Tensor* t : {&*rope_cos, &*rope_sin}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == o.Nq && t->size(1) == o.D,
                  "attention (cpu): rope tables must be contiguous float32 CPU tensors [N = ", o.Nq, ", D = ", o.D,
                  "], got ", t->sizes(), " ", t->scalar_type());
    }
    o.cos = rope_cos->data_ptr<float>(), o.sin = rope_sin->data_ptr<float>(), o.rope = static_cast<int>(a.rope_style);
  }
  return o;
}

// The masks on the token part of a logits block: rows i0 .. i0 + m of (s, h), s[r * ld + j]
// (the key and attention masks exist in batch mode only: sequence s is batch entry s). A
// float mask is added first, then the masks set -inf, as in the reference: a key hidden by
// key_mask, causal or a bool mask is -inf whatever the float mask holds there (NaN too).
void apply_masks(const Operands& o, int64_t seq, int64_t h, int64_t i0, int64_t m, float* s, int64_t ld) {
  const int64_t nk = o.nk(seq);
  if (o.attn_mask.defined() && o.attn_mask.scalar_type() != at::kBool) {
    const at::Tensor& am = o.attn_mask;
    const int64_t s0 = am.stride(0), s1 = am.stride(1), s2 = am.stride(2), s3 = am.stride(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, am.scalar_type(), "attention_cpu_mask", [&] {
      const scalar_t* base = am.data_ptr<scalar_t>() + seq * s0 + h * s1;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < nk; ++j) s[r * ld + j] += static_cast<float>(base[(i0 + r) * s2 + j * s3]);
    });
  }
  if (o.key_mask != nullptr) {
    const bool* km = o.key_mask + seq * o.Nk;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nk; ++j)
        if (!km[j]) s[r * ld + j] = kNegInf;
  }
  if (const auto offset = o.causal_offset(seq)) {
    for (int64_t r = 0; r < m; ++r) {
      const int64_t first_hidden = std::max<int64_t>(0, i0 + r + *offset + 1);
      for (int64_t j = first_hidden; j < nk; ++j) s[r * ld + j] = kNegInf;
    }
  }
  if (o.attn_mask.defined() && o.attn_mask.scalar_type() == at::kBool) {
    const at::Tensor& am = o.attn_mask;
    const int64_t s0 = am.stride(0), s1 = am.stride(1), s2 = am.stride(2), s3 = am.stride(3);
    const bool* base = am.data_ptr<bool>() + seq * s0 + h * s1;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < nk; ++j)
        if (!base[(i0 + r) * s2 + j * s3]) s[r * ld + j] = kNegInf;
  }
}

// Logits of queries i0 .. i0 + m of (s, h) against [registers ; tokens]: a [m, R + nk] block, row
// stride T. q: the block's query rows (row stride ldq), k: the sequence's token key rows (ldk),
// both already rotated when rope is on.
void logits_block(const Operands& o, int64_t seq, int64_t h, int64_t i0, int64_t m, float* s, int64_t T,
                  const float* q, int64_t ldq, const float* k, int64_t ldk) {
  if (o.R > 0) blas::gemm_rm(false, true, m, o.R, o.D, o.scale, q, ldq, o.rk_rows(seq, h), o.srk[2], 0.0f, s, T);
  blas::gemm_rm(false, true, m, o.nk(seq), o.D, o.scale, q, ldq, k, ldk, 0.0f, s + o.R, T);
  apply_masks(o, seq, h, i0, m, s + o.R, T);
}

// The query rows of a block and the token key rows of (s, h) as the GEMMs read them: in place
// without rope; rotated into the thread's buffers with it (the keys once per (s, K/V head)).
struct RowSource {
  std::vector<float> qbuf, kbuf;
  int64_t k_seq = -1, k_head = -1;

  const float* q(const Operands& o, int64_t seq, int64_t h, int64_t i0, int64_t m, int64_t* ld) {
    const float* rows = o.q_row(seq, h, i0);
    *ld = o.sq[2];
    if (o.rope == 0) return rows;
    qbuf.resize(static_cast<size_t>(m * o.D));
    rope_rows(o, rows, o.sq[2], m, i0, qbuf.data(), o.D);
    *ld = o.D;
    return qbuf.data();
  }
  const float* k(const Operands& o, int64_t seq, int64_t h, int64_t* ld) {
    const float* rows = o.k_rows(seq, h);
    *ld = o.sk[2];
    if (o.rope == 0) return rows;
    if (k_seq != seq || k_head != h / o.G) {
      kbuf.resize(static_cast<size_t>(o.nk(seq) * o.D));
      rope_rows(o, rows, o.sk[2], o.nk(seq), 0, kbuf.data(), o.D);
      k_seq = seq, k_head = h / o.G;
    }
    *ld = o.D;
    return kbuf.data();
  }
};

// p of a row whose softmax is undefined (a NaN or +inf logit): NaN, but 0 at masked keys
// (s = -inf), which no row's probability reaches (the reference's contract).
void nan_row(float* s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] = s[j] == kNegInf ? 0.0f : kNaN;
}

// Query rows per block: the [BM, R + Nk] logits block (and, backward, its gradient)
// should stay in L2 (~1 MiB per core on current x86 servers).
int64_t block_rows(int64_t T, int64_t Nq, int64_t buffers) {
  const int64_t budget = (int64_t(1) << 18) / buffers;  // floats (1 MiB in all)
  const int64_t bm = std::clamp<int64_t>(budget / std::max<int64_t>(T, 1), 16, 256);
  return std::max<int64_t>(1, std::min(bm, Nq));
}

// How many parts each sequence's key-mass sum is split into, a function of the shapes
// alone (never of the thread count, so the bits are the same on any machine): enough
// (sequence, head, part) tasks to keep 64 threads busy, at most 16 parts, and the partial
// sums beyond the first (which goes straight into key_mass) at most an eighth of the
// inputs q, k, v in size.
int64_t key_mass_parts(const Operands& o, int64_t Tmax) {
  const int64_t rows = std::max<int64_t>(1, o.S * o.H);
  const int64_t for_threads = std::clamp<int64_t>((64 + rows - 1) / rows, 1, 16);
  const int64_t inputs = o.B * (o.H * o.Nq * o.D + o.Hk * o.Nk * (o.D + o.Dv));
  const int64_t for_memory = 1 + inputs / 8 / std::max<int64_t>(1, rows * Tmax);
  return std::max<int64_t>(1, std::min(for_threads, for_memory));
}

void fwd_impl(const Operands& o, const AttentionArgs& a, const AttentionOutputs& outputs) {
  const int64_t num_prefix_tokens = a.num_prefix_tokens;
  const bool return_stats = a.return_stats;
  const bool fwd_mass = return_stats && !a.key_mass_in_backward;  // else the backward sums it (bwd_impl)
  const at::Tensor &out = outputs.out, &lse = outputs.lse, &entropy = outputs.entropy;
  const at::Tensor &register_share = outputs.register_share, &key_mass = outputs.key_mass;
  const int64_t H = o.H, Dv = o.Dv, R = o.R, S = o.S, Tmax = R + o.max_nk;
  const int64_t LQ = o.Nq;  // the queries of one (b, h) row of lse: Nq, or Tq in varlen mode
  TORCH_CHECK(num_prefix_tokens >= 0 && (o.varlen() || num_prefix_tokens <= o.Nk),
              "attention (cpu): num_prefix_tokens must be in [0, Nk], got ", num_prefix_tokens);
  check_f32(out, "out", 4, 4);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == o.B && out.size(1) == H && out.size(2) == o.Nq && out.size(3) == Dv,
              "attention (cpu): out must be [B, H, Nq, Dv] = [", o.B, ", ", H, ", ", o.Nq, ", ", Dv, "], got ",
              out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == o.B * H * LQ,
              "attention (cpu): lse must be a contiguous float32 [B, H, Nq] tensor");
  // key_mass [S, H, KW]: KW = R + Nk in batch mode; in varlen mode R + max_seqlen_k, which
  // may exceed R + the longest key sequence (columns past a sequence's keys are zeros).
  int64_t KW = Tmax;
  if (return_stats) {
    for (const at::Tensor* t : {&entropy, &register_share}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == o.B * H * LQ,
                  "attention (cpu): entropy and register_share must be contiguous float32 [B, H, Nq] tensors");
    }
  }
  if (fwd_mass) {
    KW = key_mass.dim() == 3 ? key_mass.size(2) : -1;
    TORCH_CHECK(key_mass.scalar_type() == at::kFloat && key_mass.is_contiguous() && key_mass.dim() == 3 &&
                    key_mass.size(0) == S && key_mass.size(1) == H && (o.varlen() ? KW >= Tmax : KW == Tmax),
                "attention (cpu): key_mass must be a contiguous float32 [S = ", S, ", H = ", H, ", ",
                o.varlen() ? ">= " : "", Tmax, "] tensor, got ", key_mass.sizes(), " ", key_mass.scalar_type());
  }
  const int64_t BM = block_rows(Tmax, o.max_nq, 1);
  // Tasks are (head, part of a sequence's query blocks). Without statistics a part is one
  // block. With them, a sequence has at most key_mass_parts() parts, each summing the
  // column sums of p over its blocks in order: part 0 into key_mass itself, the others
  // into partial rows added to it in order afterwards (memory O(parts x H x (R + Nk)),
  // not O(blocks x ...)).
  const int64_t max_parts = fwd_mass ? key_mass_parts(o, Tmax) : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> part_seq, part_begin, part_end, part_slot;  // blocks [begin, end) as query rows
  std::vector<int64_t> first_part(static_cast<size_t>(S + 1), 0);
  int64_t slots = 0;  // partial rows (parts other than a sequence's first)
  for (int64_t s = 0; s < S; ++s) {
    first_part[s] = static_cast<int64_t>(part_seq.size());
    const int64_t nb = (o.nq(s) + BM - 1) / BM;
    // (A sequence without queries still gets one empty part with statistics: it zeroes its key_mass rows.)
    const int64_t parts = nb == 0 ? (fwd_mass ? 1 : 0) : std::min(nb, max_parts);
    for (int64_t c = 0; c < parts; ++c) {
      part_seq.push_back(s);
      part_begin.push_back(c * nb / parts * BM);
      part_end.push_back(std::min(o.nq(s), (c + 1) * nb / parts * BM));
      part_slot.push_back(c == 0 ? -1 : slots++);
    }
  }
  first_part[S] = static_cast<int64_t>(part_seq.size());
  const int64_t nparts = first_part[S];
  float* out_p = out.data_ptr<float>();
  const int64_t so[3] = {out.stride(0), out.stride(1), out.stride(2)};
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = return_stats ? entropy.data_ptr<float>() : nullptr;
  float* share_p = return_stats ? register_share.data_ptr<float>() : nullptr;
  float* mass = fwd_mass ? key_mass.data_ptr<float>() : nullptr;
  std::vector<float> mass_parts(fwd_mass ? static_cast<size_t>(slots * H * Tmax) : 0);
  const int64_t shared_cols = R + num_prefix_tokens;  // the register share's columns
  const RowOps& vo = ops();

  // Tasks run head-major (t = h * nparts + part), so that a thread's consecutive tasks share
  // their key rows (rotated once with rope).
  at::parallel_for(0, nparts * H, 1, [&](int64_t begin, int64_t end) {
    const blas::SerialBlas serial;
    std::vector<float> buf(static_cast<size_t>(BM * Tmax));
    RowSource rows_of;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / nparts, part = t % nparts, seq = part_seq[part];
      const int64_t nk = o.nk(seq), T = R + nk;
      // The column sums of p of this part: key_mass's row (width KW) or a partial row.
      float* colsum = nullptr;
      if (fwd_mass) {
        colsum = part_slot[part] < 0 ? mass + (seq * H + h) * KW : mass_parts.data() + (part_slot[part] * H + h) * Tmax;
        std::fill(colsum, colsum + (part_slot[part] < 0 ? KW : Tmax), 0.0f);
      }
      for (int64_t i0 = part_begin[part]; i0 < part_end[part]; i0 += BM) {
        const int64_t m = std::min(BM, part_end[part] - i0);
        float* s = buf.data();
        bool any_undefined = false;  // a row with a NaN or +inf logit: its out is NaN (below)
        int64_t ldq = 0, ldk = 0;
        const float* qr = rows_of.q(o, seq, h, i0, m, &ldq);
        const float* kr = rows_of.k(o, seq, h, &ldk);
        logits_block(o, seq, h, i0, m, s, T, qr, ldq, kr, ldk);
        const float sink = o.sinks != nullptr ? o.sinks[h] : kNegInf;
        const int64_t row0 = (o.b(seq) * H + h) * LQ + o.qoff(seq) + i0;  // lse index of the block's first row
        for (int64_t r = 0; r < m; ++r) {
          float* row = s + r * T;
          const int64_t idx = row0 + r;
          const float row_mx = T > 0 ? vo.row_max(row, T) : kNegInf;  // NaN if any logit is
          if (std::isnan(row_mx) || std::isnan(sink) || row_mx == kPosInf || sink == kPosInf) {
            // A NaN or +inf logit (or sink): the softmax is undefined (inf / inf). p, out,
            // lse and the statistics of the row are NaN (reference/attention.py); masked
            // keys keep p = 0.
            nan_row(row, T);
            lse_p[idx] = kNaN;
            if (return_stats) ent_p[idx] = kNaN, share_p[idx] = kNaN;
            any_undefined = true;
            continue;
          }
          const float mx = std::max(row_mx, sink);
          if (mx == kNegInf) {  // nothing to attend (every key masked, no sink): out = 0, lse = -inf
            std::fill(row, row + T, 0.0f);
            lse_p[idx] = kNegInf;
            if (return_stats) ent_p[idx] = 0.0f, share_p[idx] = 0.0f;
            continue;
          }
          float sum_e = 0.0f, sum_es = 0.0f;
          vo.exp_row(row, T, mx, return_stats, &sum_e, &sum_es);
          if (sink != kNegInf) {
            const float es = std::exp(sink - mx);
            sum_e += es;
            sum_es += es * (sink - mx);
          }
          const float inv = 1.0f / sum_e;
          const float log_sum = std::log(sum_e);
          lse_p[idx] = mx + log_sum;
          if (return_stats) {
            // entropy = -sum p log p = log l - sum p (s - m), with l = sum_e, p = e / l and m
            // the row's max: the shifted form, which does not cancel at large logits (lse -
            // sum p s would subtract two numbers of the logits' magnitude).
            ent_p[idx] = log_sum - sum_es * inv;
            share_p[idx] = vo.row_sum(row, std::min(shared_cols, T)) * inv;
          }
          vo.scale_row(row, T, inv);
        }
        float* o_rows = out_p + o.b(seq) * so[0] + h * so[1] + (o.qoff(seq) + i0) * so[2];
        if (R > 0) blas::gemm_rm(false, false, m, Dv, R, 1.0f, s, T, o.rv_rows(seq, h), o.srv[2], 0.0f, o_rows, so[2]);
        if (nk > 0 || R == 0) {  // (no token and no register: K = 0 writes zeros)
          blas::gemm_rm(false, false, m, Dv, nk, 1.0f, s + R, T, o.v_rows(seq, h), o.sv[2], R > 0 ? 1.0f : 0.0f, o_rows,
                  so[2]);
        }
        if (any_undefined) {  // NaN p reached out through the GEMM, but for a row that attends only the sink
          for (int64_t r = 0; r < m; ++r) {
            if (std::isnan(lse_p[row0 + r])) std::fill(o_rows + r * so[2], o_rows + r * so[2] + Dv, kNaN);
          }
        }
        if (fwd_mass) {
          for (int64_t r = 0; r < m; ++r) vo.add_row(colsum, s + r * T, T);
        }
      }
    }
  });

  if (fwd_mass && slots > 0) {  // each sequence's parts, added to its first in order
    at::parallel_for(0, S * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t sh = begin; sh < end; ++sh) {
        const int64_t seq = sh / H, h = sh % H;
        float* dst = mass + sh * KW;
        for (int64_t part = first_part[seq] + 1; part < first_part[seq + 1]; ++part) {
          vo.add_row(dst, mass_parts.data() + (part_slot[part] * H + h) * Tmax, R + o.nk(seq));
        }
      }
    });
  }
}

void bwd_impl(const Operands& o, const AttentionArgs& a, const at::Tensor& dout, const at::Tensor& out,
              const at::Tensor& lse, const AttentionGrads& grads) {
  const at::Tensor &q = a.q, &k = a.k, &v = a.v, &dq = grads.dq, &dk = grads.dk, &dv = grads.dv;
  const std::optional<at::Tensor>&rk = a.rk, &rv = a.rv, &drk = grads.drk, &drv = grads.drv, &dsinks = grads.dsinks;
  const std::optional<at::Tensor>& key_mass = grads.key_mass;
  const int64_t H = o.H, Hk = o.Hk, G = o.G, D = o.D, Dv = o.Dv, R = o.R, S = o.S, LQ = o.Nq;
  const int64_t Tmax = R + o.max_nk;
  check_f32(dout, "dout", 4, 4);
  check_f32(out, "out", 4, 4);
  const std::vector<int64_t> out_shape{o.B, H, o.Nq, Dv};
  TORCH_CHECK(dout.sizes() == out_shape && out.sizes() == out_shape,
              "attention (cpu): dout and out must be [B, H, Nq, Dv]");
  check_f32(dq, "dq", 4, 4);
  check_f32(dk, "dk", 4, 4);
  check_f32(dv, "dv", 4, 4);
  TORCH_CHECK(dq.sizes() == q.sizes(), "attention (cpu): dq must have q's shape ", q.sizes());
  TORCH_CHECK(dk.sizes() == k.sizes() && dv.sizes() == v.sizes(), "attention (cpu): dk, dv must have k's, v's shapes");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == o.B * H * LQ,
              "attention (cpu): lse must be a contiguous float32 [B, H, Nq] tensor");
  const bool shared = R > 0 && rk->dim() == 3;
  if (R > 0) {
    TORCH_CHECK(drk.has_value() && drv.has_value(), "attention (cpu): drk and drv are needed with registers");
    TORCH_CHECK(drk->sizes() == rk->sizes() && drv->sizes() == rv->sizes() && drk->scalar_type() == at::kFloat &&
                    drv->scalar_type() == at::kFloat && drk->is_contiguous() && drv->is_contiguous(),
                "attention (cpu): drk, drv must be contiguous float32 tensors of rk's, rv's shapes ", rk->sizes(), ", ",
                rv->sizes());
  }
  if (dsinks.has_value()) {
    TORCH_CHECK(o.sinks != nullptr && dsinks->scalar_type() == at::kFloat && dsinks->numel() == H &&
                    dsinks->is_contiguous(),
                "attention (cpu): dsinks must be a contiguous float32 [H] tensor, given with sinks");
  }
  // key_mass [S, H, KW] (KW = R + Nk; packed: >= R + the longest key sequence), filled with
  // the column sums of the P this pass recomputes, over the query blocks in order.
  int64_t KW = Tmax;
  float* mass = nullptr;
  if (key_mass.has_value()) {
    KW = key_mass->dim() == 3 ? key_mass->size(2) : -1;
    TORCH_CHECK(key_mass->scalar_type() == at::kFloat && key_mass->is_contiguous() && key_mass->dim() == 3 &&
                    key_mass->size(0) == S && key_mass->size(1) == H && (o.varlen() ? KW >= Tmax : KW == Tmax),
                "attention (cpu): key_mass must be a contiguous float32 [S = ", S, ", H = ", H, ", ",
                o.varlen() ? ">= " : "", Tmax, "] tensor, got ", key_mass->sizes(), " ", key_mass->scalar_type());
    mass = key_mass->data_ptr<float>();
  }
  const int64_t BM = block_rows(Tmax, o.max_nq, 2);
  const float* lse_p = lse.data_ptr<float>();
  const float* do_p = dout.data_ptr<float>();
  const float* o_p = out.data_ptr<float>();
  float* dq_p = dq.data_ptr<float>();
  float* dk_p = dk.data_ptr<float>();
  float* dv_p = dv.data_ptr<float>();
  int64_t sdo[3], sout[3], sdq[3], sdk[3], sdv[3];
  strides3(dout, sdo), strides3(out, sout), strides3(dq, sdq), strides3(dk, sdk), strides3(dv, sdv);
  // Register gradients per (s, h): written in place for per-sample registers, summed over
  // the sequences in order afterwards for shared ones; the sink's per (s, h), summed the same way.
  const int64_t RD = R * D, RDv = R * Dv;
  std::vector<float> reg_parts(shared ? static_cast<size_t>(S * H * (RD + RDv)) : 0);
  std::vector<float> sink_parts(static_cast<size_t>(S * H), 0.0f);
  const RowOps& vo = ops();

  // One task per (sequence, K/V head): its G query heads run in order and add into the same
  // dk, dv rows, so grouped heads need no atomics and no expanded copy; the sequences'
  // key rows are disjoint.
  at::parallel_for(0, S * Hk, 1, [&](int64_t begin, int64_t end) {
    const blas::SerialBlas serial;
    std::vector<float> p(static_cast<size_t>(BM * Tmax)), dp(static_cast<size_t>(BM * Tmax));
    std::vector<float> delta(static_cast<size_t>(BM)), tmp(static_cast<size_t>(D));
    RowSource rows_of;
    for (int64_t shk = begin; shk < end; ++shk) {
      const int64_t seq = shk / Hk, hk = shk % Hk, b = o.b(seq), nq = o.nq(seq), nk = o.nk(seq), T = R + nk;
      float* dk_rows = dk_p + b * sdk[0] + hk * sdk[1] + o.koff(seq) * sdk[2];
      float* dv_rows = dv_p + b * sdv[0] + hk * sdv[1] + o.koff(seq) * sdv[2];
      if (nq == 0) {  // no query: no gradient for this sequence's keys
        for (int64_t j = 0; j < nk; ++j) {
          std::fill(dk_rows + j * sdk[2], dk_rows + j * sdk[2] + D, 0.0f);
          std::fill(dv_rows + j * sdv[2], dv_rows + j * sdv[2] + Dv, 0.0f);
        }
      }
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        const int64_t sh = seq * H + h;
        float *drk_rows = nullptr, *drv_rows = nullptr;
        if (R > 0) {
          if (shared) {
            drk_rows = reg_parts.data() + sh * (RD + RDv);
            drv_rows = drk_rows + RD;
          } else {
            drk_rows = drk->data_ptr<float>() + sh * RD;
            drv_rows = drv->data_ptr<float>() + sh * RDv;
          }
          if (nq == 0) std::fill(drk_rows, drk_rows + RD, 0.0f), std::fill(drv_rows, drv_rows + RDv, 0.0f);
        }
        const float sink = o.sinks != nullptr ? o.sinks[h] : kNegInf;
        float dsink = 0.0f;
        float* colsum = mass != nullptr ? mass + sh * KW : nullptr;
        if (colsum != nullptr) std::fill(colsum, colsum + KW, 0.0f);
        const int64_t row0 = (b * H + h) * LQ + o.qoff(seq);  // lse index of the sequence's first query
        for (int64_t i0 = 0; i0 < nq; i0 += BM) {
          const int64_t m = std::min(BM, nq - i0);
          const float beta_r = i0 == 0 ? 0.0f : 1.0f;               // the first block initialises drk, drv
          const float beta = i0 == 0 && h == hk * G ? 0.0f : 1.0f;  // ... and the group's first head dk, dv
          int64_t ldq = 0, ldk = 0;
          const float* q_rows = rows_of.q(o, seq, h, i0, m, &ldq);
          const float* k_rows = rows_of.k(o, seq, h, &ldk);
          logits_block(o, seq, h, i0, m, p.data(), T, q_rows, ldq, k_rows, ldk);
          const int64_t qrow = o.qoff(seq) + i0;
          for (int64_t r = 0; r < m; ++r) {
            const float row_lse = lse_p[row0 + i0 + r];
            float* row = p.data() + r * T;
            const float* dor = do_p + b * sdo[0] + h * sdo[1] + (qrow + r) * sdo[2];
            const float* orow = o_p + b * sout[0] + h * sout[1] + (qrow + r) * sout[2];
            float d = 0.0f;
            for (int64_t c = 0; c < Dv; ++c) d += dor[c] * orow[c];
            delta[r] = d;
            if (row_lse == kNegInf) {  // a query that attends nothing: no gradient
              std::fill(row, row + T, 0.0f);
              continue;
            }
            if (std::isnan(row_lse)) {  // a NaN row (a NaN or +inf logit, see the forward): p is NaN
              nan_row(row, T);
              if (sink != kNegInf) dsink = kNaN;
              continue;
            }
            float unused_e, unused_es;
            vo.exp_row(row, T, row_lse, false, &unused_e, &unused_es);  // p = exp(s - lse)
            if (sink != kNegInf) dsink -= std::exp(sink - row_lse) * d;
          }
          if (colsum != nullptr) {  // (before dS overwrites dp; p stays P)
            for (int64_t r = 0; r < m; ++r) vo.add_row(colsum, p.data() + r * T, T);
          }
          const float* do_rows = do_p + b * sdo[0] + h * sdo[1] + qrow * sdo[2];
          // dV += P^T dO
          blas::gemm_rm(true, false, nk, Dv, m, 1.0f, p.data() + R, T, do_rows, sdo[2], beta, dv_rows, sdv[2]);
          if (R > 0) blas::gemm_rm(true, false, R, Dv, m, 1.0f, p.data(), T, do_rows, sdo[2], beta_r, drv_rows, Dv);
          // dP = dO V^T; dS = P (dP - delta)
          blas::gemm_rm(false, true, m, nk, Dv, 1.0f, do_rows, sdo[2], o.v_rows(seq, h), o.sv[2], 0.0f, dp.data() + R, T);
          if (R > 0) {
            blas::gemm_rm(false, true, m, R, Dv, 1.0f, do_rows, sdo[2], o.rv_rows(seq, h), o.srv[2], 0.0f, dp.data(), T);
          }
          for (int64_t r = 0; r < m; ++r) vo.softmax_grad_row(p.data() + r * T, dp.data() + r * T, T, delta[r]);
          // dQ = scale dS [rk ; k]; dK += scale dS^T Q
          float* dq_rows = dq_p + b * sdq[0] + h * sdq[1] + qrow * sdq[2];
          if (R > 0) {
            blas::gemm_rm(false, false, m, D, R, o.scale, dp.data(), T, o.rk_rows(seq, h), o.srk[2], 0.0f, dq_rows, sdq[2]);
          }
          if (nk > 0 || R == 0) {
            blas::gemm_rm(false, false, m, D, nk, o.scale, dp.data() + R, T, k_rows, ldk, R > 0 ? 1.0f : 0.0f, dq_rows,
                    sdq[2]);
          }
          if (o.rope != 0) rope_rows_transpose(o, dq_rows, sdq[2], m, i0, tmp.data());  // the rows are complete
          blas::gemm_rm(true, false, nk, D, m, o.scale, dp.data() + R, T, q_rows, ldq, beta, dk_rows, sdk[2]);
          if (R > 0) blas::gemm_rm(true, false, R, D, m, o.scale, dp.data(), T, q_rows, ldq, beta_r, drk_rows, D);
        }
        sink_parts[sh] = dsink;
      }
      // dk of the rotated keys, summed over the group and the query blocks: rotate back once.
      if (o.rope != 0 && nq > 0) rope_rows_transpose(o, dk_rows, sdk[2], nk, 0, tmp.data());
    }
  });

  if (shared) {  // sum over the sequences (the batch), in order
    float* gk = drk->data_ptr<float>();
    float* gv = drv->data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t s = 0; s < S; ++s) {
        const float* pk = reg_parts.data() + (s * H + h) * (RD + RDv);
        const float* pv = pk + RD;
        if (s == 0) {
          std::copy(pk, pk + RD, gk + h * RD);
          std::copy(pv, pv + RDv, gv + h * RDv);
        } else {
          vo.add_row(gk + h * RD, pk, RD);
          vo.add_row(gv + h * RDv, pv, RDv);
        }
      }
    }
  }
  if (dsinks.has_value()) {
    float* g = dsinks->data_ptr<float>();
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      for (int64_t s = 0; s < S; ++s) acc += sink_parts[s * H + h];
      g[h] = acc;
    }
  }
}

}  // namespace

void attention_fwd_cpu(const AttentionArgs& args, const AttentionOutputs& outputs) {
  at::Tensor km_holder;
  fwd_impl(make_operands(args, km_holder), args, outputs);
}

void attention_bwd_cpu(const AttentionArgs& args, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                       const AttentionGrads& grads) {
  at::Tensor km_holder;
  bwd_impl(make_operands(args, km_holder), args, dout, out, lse, grads);
}

const char* attention_cpu_capability() { return ops().name; }

// The fields of AttentionArgs in dsr_kernels/attention_call.py's order (a test compares the two).
const char* const kAttentionArgsSchema =
    "Tensor q, Tensor k, Tensor v, Tensor? rk, Tensor? rv, Tensor? sinks, Tensor? key_mask, Tensor? attn_mask, "
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? rope_cos, "
    "Tensor? rope_sin, int rope_style, int causal, int num_prefix_tokens, float scale, bool return_stats, "
    "bool key_mass_in_backward";

namespace {

constexpr size_t kArgFields = 20;

// AttentionArgs from the op's arguments args[0] .. args[kArgFields - 1], in schema order:
// the one place that reads them.
AttentionArgs args_from(const c10::IValue* f) {
  AttentionArgs a;
  a.q = f[0].toTensor(), a.k = f[1].toTensor(), a.v = f[2].toTensor();
  a.rk = f[3].toOptional<at::Tensor>(), a.rv = f[4].toOptional<at::Tensor>();
  a.sinks = f[5].toOptional<at::Tensor>(), a.key_mask = f[6].toOptional<at::Tensor>();
  a.attn_mask = f[7].toOptional<at::Tensor>();
  a.cu_seqlens_q = f[8].toOptional<at::Tensor>(), a.cu_seqlens_k = f[9].toOptional<at::Tensor>();
  a.max_seqlen_q = f[10].toInt(), a.max_seqlen_k = f[11].toInt();
  a.rope_cos = f[12].toOptional<at::Tensor>(), a.rope_sin = f[13].toOptional<at::Tensor>();
  a.rope_style = static_cast<RopeStyle>(f[14].toInt());
  a.causal = static_cast<Causal>(f[15].toInt());
  a.num_prefix_tokens = f[16].toInt();
  a.scale = f[17].toDouble();
  a.return_stats = f[18].toBool();
  a.key_mass_in_backward = f[19].toBool();
  return a;
}

// attention_fwd_cpu(<AttentionArgs>, out, lse, entropy, register_share, key_mass) -> ()
void fwd_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  TORCH_INTERNAL_ASSERT(n == kArgFields + 5);
  const c10::IValue* f = &(*stack)[stack->size() - n];
  const AttentionOutputs outputs{f[kArgFields].toTensor(), f[kArgFields + 1].toTensor(), f[kArgFields + 2].toTensor(),
                                 f[kArgFields + 3].toTensor(), f[kArgFields + 4].toTensor()};
  attention_fwd_cpu(args_from(f), outputs);
  torch::jit::drop(*stack, n);
}

// attention_bwd_cpu(dout, out, lse, <AttentionArgs>, dq, dk, dv, drk?, drv?, dsinks?, key_mass?) -> ()
void bwd_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  TORCH_INTERNAL_ASSERT(n == 3 + kArgFields + 7);
  const c10::IValue* f = &(*stack)[stack->size() - n];
  const c10::IValue* g = f + 3 + kArgFields;
  const AttentionGrads grads{g[0].toTensor(),
                             g[1].toTensor(),
                             g[2].toTensor(),
                             g[3].toOptional<at::Tensor>(),
                             g[4].toOptional<at::Tensor>(),
                             g[5].toOptional<at::Tensor>(),
                             g[6].toOptional<at::Tensor>()};
  attention_bwd_cpu(args_from(f + 3), f[0].toTensor(), f[1].toTensor(), f[2].toTensor(), grads);
  torch::jit::drop(*stack, n);
}

// Meta: the outputs are the caller's, nothing to compute.
void meta_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  torch::jit::drop(*stack, op.schema().arguments().size());
}

}  // namespace
}  // namespace dsr_kernels

// The attention ops write into outputs the Python launcher allocates (dsr_kernels/cpu/
// attention.py), which is what the Python custom op dsr_kernels::attention_fwd / _bwd
// calls for backend "cpu".
TORCH_LIBRARY_FRAGMENT(dsr_kernels, m) {
  const std::string fields = dsr_kernels::kAttentionArgsSchema;
  const std::string fwd = "attention_fwd_cpu(" + fields +
                          ", Tensor(a!) out, Tensor(b!) lse, Tensor(c!) entropy, Tensor(d!) register_share, "
                          "Tensor(e!) key_mass) -> ()";
  const std::string bwd = "attention_bwd_cpu(Tensor dout, Tensor out, Tensor lse, " + fields +
                          ", Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!)? drk, Tensor(e!)? drv, "
                          "Tensor(f!)? dsinks, Tensor(g!)? key_mass) -> ()";
  m.def(fwd.c_str());
  m.def(bwd.c_str());
  m.def("attention_cpu_capability() -> str", [] { return std::string(dsr_kernels::attention_cpu_capability()); });
}

TORCH_LIBRARY_IMPL(dsr_kernels, CPU, m) {
  m.impl("attention_fwd_cpu", torch::CppFunction::makeFromBoxedFunction<&dsr_kernels::fwd_boxed>());
  m.impl("attention_bwd_cpu", torch::CppFunction::makeFromBoxedFunction<&dsr_kernels::bwd_boxed>());
}

TORCH_LIBRARY_IMPL(dsr_kernels, Meta, m) {
  m.impl("attention_fwd_cpu", torch::CppFunction::makeFromBoxedFunction<&dsr_kernels::meta_boxed>());
  m.impl("attention_bwd_cpu", torch::CppFunction::makeFromBoxedFunction<&dsr_kernels::meta_boxed>());
}
