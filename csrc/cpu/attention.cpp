// Register attention with its statistics in one pass, and its backward, on the CPU.
// See csrc/include/dsr_kernels/attention.h for the algorithm; the definition is
// dsr_kernels/reference/attention.py. GEMMs go through ATen's CPU BLAS (MKL / OpenBLAS,
// one thread inside the parallel region), the row operations through the vector code of
// attention_vec.h compiled for SSE, AVX2 and AVX-512 and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
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

// The Fortran BLAS sgemm of the BLAS libtorch links (MKL on x86 wheels, OpenBLAS or
// Accelerate elsewhere), which libtorch_cpu exports; ATen's own cpublas::gemm is not
// exported to extensions. Weak: where it is missing, gemm_rm falls back to at::addmm_out.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (libtorch_cpu exports it where torch links MKL): inside our
// parallel region each GEMM must run on its own thread; MKL does not see libgomp's region
// and would start threads of its own on every call (measured: 5x slower on 2 cores).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // (mkl_set_num_threads_local: by pointer)

namespace dsr_kernels {
namespace {

// Within its scope, BLAS calls of this thread run on this thread only.
class SerialBlas {
 public:
  SerialBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int previous_;
};

at::Tensor view_rm(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

// Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C, through the column-major BLAS
// (C^T = op(B)^T op(A)^T: a row-major matrix read column-major is its transpose).
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta C (an empty product; BLAS would reject the zero leading dimension of A)
    for (int64_t i = 0; i < M; ++i) {
      float* row = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  // BLAS takes a leading dimension of at least the row length (it prints an error and
  // returns without writing C otherwise). A matrix of one row is read once, whatever its
  // stride; for more rows a smaller stride (expanded or overlapping rows) is a caller's
  // bug, raised here rather than handed on. (The launchers copy such operands.)
  auto leading = [](const char* what, int64_t ld, int64_t rows, int64_t cols) {
    if (rows <= 1) return std::max<int64_t>(ld, std::max<int64_t>(cols, 1));
    TORCH_CHECK(ld >= cols, "attention (cpu): ", what, " rows have stride ", ld, " below their length ", cols,
                " (expanded or overlapping rows must be copied before the kernel)");
    return ld;
  };
  lda = trans_a ? leading("an operand's", lda, K, M) : leading("an operand's", lda, M, K);
  ldb = trans_b ? leading("an operand's", ldb, N, K) : leading("an operand's", ldb, K, N);
  ldc = leading("an output's", ldc, M, N);
  if (sgemm_ != nullptr) {
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
                "attention (cpu): a block of ", M, " x ", N, " x ", K, " exceeds the 32-bit BLAS interface");
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  at::Tensor c = view_rm(C, M, N, ldc, false);
  at::Tensor a = trans_a ? view_rm(A, K, M, lda, true) : view_rm(A, M, K, lda, false);
  at::Tensor b = trans_b ? view_rm(B, N, K, ldb, true) : view_rm(B, K, N, ldb, false);
  if (beta == 0.0f) c.zero_();  // addmm's beta = 0 still reads C (NaN * 0)
  at::addmm_out(c, c, a, b, beta, alpha);
}

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
  std::optional<int64_t> causal;  // batch: the offset; varlen: bottom-right in each sequence
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
  std::optional<int64_t> causal_offset(int64_t s) const {
    if (!causal.has_value()) return std::nullopt;
    return varlen() ? nk(s) - nq(s) : *causal;
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
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "attention (cpu): ", name,
              " must have a contiguous last dim, got strides ", t.strides());
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

Operands make_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                       const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
                       const std::optional<at::Tensor>& attn_mask, double scale,
                       std::optional<int64_t> causal_offset, at::Tensor& key_mask_holder,
                       const at::Tensor* cu_seqlens_q = nullptr, const at::Tensor* cu_seqlens_k = nullptr,
                       const std::optional<at::Tensor>& rope_cos = std::nullopt,
                       const std::optional<at::Tensor>& rope_sin = std::nullopt, int64_t rope_style = 0) {
  check_f32(q, "q", 4, 4);
  check_f32(k, "k", 4, 4);
  check_f32(v, "v", 4, 4);
  Operands o;
  o.B = q.size(0), o.H = q.size(1), o.Nq = q.size(2), o.D = q.size(3), o.Nk = k.size(2);
  o.Hk = k.size(1), o.Dv = v.size(3);
  const bool varlen = cu_seqlens_q != nullptr;
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
    o.cu_q = offsets(*cu_seqlens_q, "cu_seqlens_q", o.Nq);
    o.cu_k = offsets(*cu_seqlens_k, "cu_seqlens_k", o.Nk);
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
  o.causal = varlen && causal_offset.has_value() ? std::optional<int64_t>(0) : causal_offset;
  o.scale = static_cast<float>(scale);
  TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), "attention (cpu): rope_cos and rope_sin go together");
  if (rope_cos.has_value()) {
    TORCH_CHECK(!varlen, "attention (cpu): rope tables are for batch mode (one position per query / key row)");
    TORCH_CHECK(rope_style == 1 || rope_style == 2,
                "attention (cpu): rope_style must be 1 (interleaved) or 2 (half), got ", rope_style);
    TORCH_CHECK(o.Nq == o.Nk && o.D % 2 == 0,
                "attention (cpu): rope needs self-attention (Nq == Nk) and an even D, got Nq ", o.Nq, ", Nk ", o.Nk,
                ", D ", o.D);
    for (const at::Tensor* t : {&*rope_cos, &*rope_sin}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == o.Nq && t->size(1) == o.D,
                  "attention (cpu): rope tables must be contiguous float32 CPU tensors [N = ", o.Nq, ", D = ", o.D,
                  "], got ", t->sizes(), " ", t->scalar_type());
    }
    o.cos = rope_cos->data_ptr<float>(), o.sin = rope_sin->data_ptr<float>(), o.rope = static_cast<int>(rope_style);
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
  if (o.R > 0) gemm_rm(false, true, m, o.R, o.D, o.scale, q, ldq, o.rk_rows(seq, h), o.srk[2], 0.0f, s, T);
  gemm_rm(false, true, m, o.nk(seq), o.D, o.scale, q, ldq, k, ldk, 0.0f, s + o.R, T);
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

void fwd_impl(const Operands& o, int64_t num_prefix_tokens, bool return_stats, const at::Tensor& out,
              const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& register_share,
              const at::Tensor& key_mass) {
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
  const int64_t max_parts = return_stats ? key_mass_parts(o, Tmax) : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> part_seq, part_begin, part_end, part_slot;  // blocks [begin, end) as query rows
  std::vector<int64_t> first_part(static_cast<size_t>(S + 1), 0);
  int64_t slots = 0;  // partial rows (parts other than a sequence's first)
  for (int64_t s = 0; s < S; ++s) {
    first_part[s] = static_cast<int64_t>(part_seq.size());
    const int64_t nb = (o.nq(s) + BM - 1) / BM;
    // (A sequence without queries still gets one empty part with statistics: it zeroes its key_mass rows.)
    const int64_t parts = nb == 0 ? (return_stats ? 1 : 0) : std::min(nb, max_parts);
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
  float* mass = return_stats ? key_mass.data_ptr<float>() : nullptr;
  std::vector<float> mass_parts(return_stats ? static_cast<size_t>(slots * H * Tmax) : 0);
  const int64_t shared_cols = R + num_prefix_tokens;  // the register share's columns
  const RowOps& vo = ops();

  // Tasks run head-major (t = h * nparts + part), so that a thread's consecutive tasks share
  // their key rows (rotated once with rope).
  at::parallel_for(0, nparts * H, 1, [&](int64_t begin, int64_t end) {
    const SerialBlas serial;
    std::vector<float> buf(static_cast<size_t>(BM * Tmax));
    RowSource rows_of;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / nparts, part = t % nparts, seq = part_seq[part];
      const int64_t nk = o.nk(seq), T = R + nk;
      // The column sums of p of this part: key_mass's row (width KW) or a partial row.
      float* colsum = nullptr;
      if (return_stats) {
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
        if (R > 0) gemm_rm(false, false, m, Dv, R, 1.0f, s, T, o.rv_rows(seq, h), o.srv[2], 0.0f, o_rows, so[2]);
        if (nk > 0 || R == 0) {  // (no token and no register: K = 0 writes zeros)
          gemm_rm(false, false, m, Dv, nk, 1.0f, s + R, T, o.v_rows(seq, h), o.sv[2], R > 0 ? 1.0f : 0.0f, o_rows,
                  so[2]);
        }
        if (any_undefined) {  // NaN p reached out through the GEMM, but for a row that attends only the sink
          for (int64_t r = 0; r < m; ++r) {
            if (std::isnan(lse_p[row0 + r])) std::fill(o_rows + r * so[2], o_rows + r * so[2] + Dv, kNaN);
          }
        }
        if (return_stats) {
          for (int64_t r = 0; r < m; ++r) vo.add_row(colsum, s + r * T, T);
        }
      }
    }
  });

  if (return_stats && slots > 0) {  // each sequence's parts, added to its first in order
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

void bwd_impl(const Operands& o, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
              const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const std::optional<at::Tensor>& drk,
              const std::optional<at::Tensor>& drv, const std::optional<at::Tensor>& dsinks,
              const std::optional<at::Tensor>& rk, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& rv) {
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
    const SerialBlas serial;
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
          const float* do_rows = do_p + b * sdo[0] + h * sdo[1] + qrow * sdo[2];
          // dV += P^T dO
          gemm_rm(true, false, nk, Dv, m, 1.0f, p.data() + R, T, do_rows, sdo[2], beta, dv_rows, sdv[2]);
          if (R > 0) gemm_rm(true, false, R, Dv, m, 1.0f, p.data(), T, do_rows, sdo[2], beta_r, drv_rows, Dv);
          // dP = dO V^T; dS = P (dP - delta)
          gemm_rm(false, true, m, nk, Dv, 1.0f, do_rows, sdo[2], o.v_rows(seq, h), o.sv[2], 0.0f, dp.data() + R, T);
          if (R > 0) {
            gemm_rm(false, true, m, R, Dv, 1.0f, do_rows, sdo[2], o.rv_rows(seq, h), o.srv[2], 0.0f, dp.data(), T);
          }
          for (int64_t r = 0; r < m; ++r) vo.softmax_grad_row(p.data() + r * T, dp.data() + r * T, T, delta[r]);
          // dQ = scale dS [rk ; k]; dK += scale dS^T Q
          float* dq_rows = dq_p + b * sdq[0] + h * sdq[1] + qrow * sdq[2];
          if (R > 0) {
            gemm_rm(false, false, m, D, R, o.scale, dp.data(), T, o.rk_rows(seq, h), o.srk[2], 0.0f, dq_rows, sdq[2]);
          }
          if (nk > 0 || R == 0) {
            gemm_rm(false, false, m, D, nk, o.scale, dp.data() + R, T, k_rows, ldk, R > 0 ? 1.0f : 0.0f, dq_rows,
                    sdq[2]);
          }
          if (o.rope != 0) rope_rows_transpose(o, dq_rows, sdq[2], m, i0, tmp.data());  // the rows are complete
          gemm_rm(true, false, nk, D, m, o.scale, dp.data() + R, T, q_rows, ldq, beta, dk_rows, sdk[2]);
          if (R > 0) gemm_rm(true, false, R, D, m, o.scale, dp.data(), T, q_rows, ldq, beta_r, drk_rows, D);
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

void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                       const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
                       const std::optional<at::Tensor>& attn_mask, int64_t num_prefix_tokens, double scale,
                       std::optional<int64_t> causal_offset, bool return_stats, const at::Tensor& out,
                       const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& register_share,
                       const at::Tensor& key_mass, const std::optional<at::Tensor>& rope_cos,
                       const std::optional<at::Tensor>& rope_sin, int64_t rope_style) {
  at::Tensor km_holder;
  const Operands o = make_operands(q, k, v, rk, rv, sinks, key_mask, attn_mask, scale, causal_offset, km_holder,
                                   nullptr, nullptr, rope_cos, rope_sin, rope_style);
  fwd_impl(o, num_prefix_tokens, return_stats, out, lse, entropy, register_share, key_mass);
}

void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                       const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
                       const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse,
                       double scale, std::optional<int64_t> causal_offset, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv, const std::optional<at::Tensor>& drk,
                       const std::optional<at::Tensor>& drv, const std::optional<at::Tensor>& dsinks,
                       const std::optional<at::Tensor>& rope_cos, const std::optional<at::Tensor>& rope_sin,
                       int64_t rope_style) {
  at::Tensor km_holder;
  const Operands o = make_operands(q, k, v, rk, rv, sinks, key_mask, attn_mask, scale, causal_offset, km_holder,
                                   nullptr, nullptr, rope_cos, rope_sin, rope_style);
  bwd_impl(o, dout, out, lse, dq, dk, dv, drk, drv, dsinks, rk, q, k, v, rv);
}

void attention_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                              const std::optional<at::Tensor>& sinks, int64_t num_prefix_tokens, double scale,
                              bool causal, bool return_stats, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& entropy, const at::Tensor& register_share,
                              const at::Tensor& key_mass) {
  at::Tensor km_holder;
  const Operands o = make_operands(q, k, v, rk, rv, sinks, std::nullopt, std::nullopt, scale,
                                   causal ? std::optional<int64_t>(0) : std::nullopt, km_holder, &cu_seqlens_q,
                                   &cu_seqlens_k);
  fwd_impl(o, num_prefix_tokens, return_stats, out, lse, entropy, register_share, key_mass);
}

void attention_varlen_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                              const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                              const std::optional<at::Tensor>& sinks, const at::Tensor& out, const at::Tensor& lse,
                              double scale, bool causal, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv, const std::optional<at::Tensor>& drk,
                              const std::optional<at::Tensor>& drv, const std::optional<at::Tensor>& dsinks) {
  at::Tensor km_holder;
  const Operands o = make_operands(q, k, v, rk, rv, sinks, std::nullopt, std::nullopt, scale,
                                   causal ? std::optional<int64_t>(0) : std::nullopt, km_holder, &cu_seqlens_q,
                                   &cu_seqlens_k);
  bwd_impl(o, dout, out, lse, dq, dk, dv, drk, drv, dsinks, rk, q, k, v, rv);
}

const char* attention_cpu_capability() { return ops().name; }

namespace {

void fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rk,
            const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& sinks,
            const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& attn_mask,
            int64_t num_prefix_tokens, double scale, std::optional<int64_t> causal_offset, bool return_stats,
            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& register_share,
            const at::Tensor& key_mass, const std::optional<at::Tensor>& rope_cos,
            const std::optional<at::Tensor>& rope_sin, int64_t rope_style) {
  attention_fwd_cpu(q, k, v, rk, rv, sinks, key_mask, attn_mask, num_prefix_tokens, scale, causal_offset,
                    return_stats, out, lse, entropy, register_share, key_mass, rope_cos, rope_sin, rope_style);
}

void bwd_op(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
            const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_mask,
            const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse, double scale,
            std::optional<int64_t> causal_offset, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
            const std::optional<at::Tensor>& drk, const std::optional<at::Tensor>& drv,
            const std::optional<at::Tensor>& dsinks, const std::optional<at::Tensor>& rope_cos,
            const std::optional<at::Tensor>& rope_sin, int64_t rope_style) {
  attention_bwd_cpu(dout, q, k, v, rk, rv, sinks, key_mask, attn_mask, out, lse, scale, causal_offset, dq, dk, dv,
                    drk, drv, dsinks, rope_cos, rope_sin, rope_style);
}

// Shape-only checks for the Meta kernels: the outputs are the caller's, nothing to compute.
void fwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, int64_t, double, std::optional<int64_t>, bool, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t) {}

void bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, double, std::optional<int64_t>, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              int64_t) {}

void varlen_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                   const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& rk,
                   const std::optional<at::Tensor>& rv, const std::optional<at::Tensor>& sinks,
                   int64_t num_prefix_tokens, double scale, bool causal, bool return_stats, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& register_share,
                   const at::Tensor& key_mass) {
  attention_varlen_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, rk, rv, sinks, num_prefix_tokens, scale, causal,
                           return_stats, out, lse, entropy, register_share, key_mass);
}

void varlen_bwd_op(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                   const std::optional<at::Tensor>& rk, const std::optional<at::Tensor>& rv,
                   const std::optional<at::Tensor>& sinks, const at::Tensor& out, const at::Tensor& lse, double scale,
                   bool causal, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                   const std::optional<at::Tensor>& drk, const std::optional<at::Tensor>& drv,
                   const std::optional<at::Tensor>& dsinks) {
  attention_varlen_bwd_cpu(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, rk, rv, sinks, out, lse, scale, causal, dq,
                           dk, dv, drk, drv, dsinks);
}

void varlen_fwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, int64_t, double, bool, bool, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {}

void varlen_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, bool,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {}

}  // namespace
}  // namespace dsr_kernels

// The attention ops write into outputs the Python launcher allocates (dsr_kernels/cpu/
// attention.py), which is what the Python custom op dsr_kernels::attention_fwd / _bwd
// calls for backend "cpu".
TORCH_LIBRARY_FRAGMENT(dsr_kernels, m) {
  m.def(
      "attention_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor? rk, Tensor? rv, Tensor? sinks, Tensor? key_mask, "
      "Tensor? attn_mask, int num_prefix_tokens, float scale, int? causal_offset, bool return_stats, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) entropy, Tensor(d!) register_share, Tensor(e!) key_mass, "
      "Tensor? rope_cos=None, Tensor? rope_sin=None, int rope_style=0) -> ()");
  m.def(
      "attention_bwd_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rk, Tensor? rv, Tensor? sinks, "
      "Tensor? key_mask, Tensor? attn_mask, Tensor out, Tensor lse, float scale, int? causal_offset, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!)? drk, Tensor(e!)? drv, Tensor(f!)? dsinks, "
      "Tensor? rope_cos=None, Tensor? rope_sin=None, int rope_style=0) -> ()");
  m.def(
      "attention_varlen_fwd_cpu(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? rk, "
      "Tensor? rv, Tensor? sinks, int num_prefix_tokens, float scale, bool causal, bool return_stats, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!) entropy, Tensor(d!) register_share, Tensor(e!) key_mass) -> ()");
  m.def(
      "attention_varlen_bwd_cpu(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? rk, Tensor? rv, Tensor? sinks, Tensor out, Tensor lse, float scale, bool causal, Tensor(a!) dq, "
      "Tensor(b!) dk, Tensor(c!) dv, Tensor(d!)? drk, Tensor(e!)? drv, Tensor(f!)? dsinks) -> ()");
  m.def("attention_cpu_capability() -> str", [] { return std::string(dsr_kernels::attention_cpu_capability()); });
}

TORCH_LIBRARY_IMPL(dsr_kernels, CPU, m) {
  m.impl("attention_fwd_cpu", &dsr_kernels::fwd_op);
  m.impl("attention_bwd_cpu", &dsr_kernels::bwd_op);
  m.impl("attention_varlen_fwd_cpu", &dsr_kernels::varlen_fwd_op);
  m.impl("attention_varlen_bwd_cpu", &dsr_kernels::varlen_bwd_op);
}

TORCH_LIBRARY_IMPL(dsr_kernels, Meta, m) {
  m.impl("attention_fwd_cpu", &dsr_kernels::fwd_meta);
  m.impl("attention_bwd_cpu", &dsr_kernels::bwd_meta);
  m.impl("attention_varlen_fwd_cpu", &dsr_kernels::varlen_fwd_meta);
  m.impl("attention_varlen_bwd_cpu", &dsr_kernels::varlen_bwd_meta);
}
