// CPU kernels of norm_modulate: rows (tokens) split over threads by at::parallel_for.
//
// Forward, per row: one pass sums the row (and its squares; max |h| and sum h^4 for the
// moments), converting a half / bfloat16 row once into a thread-local float buffer; a
// second (LayerNorm) takes the centred variance from the row, now in L1 (D = 1152 floats
// is 4.5 KiB); a third writes out = (h - mean) * rstd * a + c with the per-sample
// coefficients a = w (1 + scale), c = bias (1 + scale) + shift. For float, half and
// bfloat16 these loops are vector code (norm_modulate_vec.h) compiled for SSE, AVX2 and
// AVX-512 and picked at run time (cpu_capability.h), every instruction set giving the
// same bits; double runs the scalar loops below. The outputs are large fresh tensors, so
// csrc/norm_modulate.cpp asks for huge pages for them (advise_huge_pages).
//
// Backward: one task per (sample, chunk of kRowsPerChunk rows), so the parameter-gradient
// partial sums do not depend on the thread count; the same per-ISA vector code.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "dsr_kernels/cpu_capability.h"
#include "dsr_kernels/norm_modulate.h"

namespace dsr_kernels {
namespace {

// max(a, b) that, as torch.amax, gives NaN when either is NaN.
template <typename acc_t>
inline acc_t max_nan(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// Per-sample coefficients of the fused output: out = (h - mean) * rstd * a + c with
// a = weight * (1 + scale[b]) and c = bias * (1 + scale[b]) + shift[b]. [B, D] each,
// computed once per call, so the per-row output is one multiply-add pass.
template <typename acc_t>
void output_coefficients(const NormModulateArgs& a, std::vector<acc_t>& coef_a, std::vector<acc_t>& coef_c) {
  const int64_t B = a.B, D = a.D;
  const acc_t* shift = a.shift.defined() ? a.shift.const_data_ptr<acc_t>() : nullptr;
  const acc_t* scale = a.scale.defined() ? a.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* w = a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bias = a.bias.defined() ? a.bias.const_data_ptr<acc_t>() : nullptr;
  coef_a.resize(B * D);
  coef_c.resize(B * D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      const acc_t s = scale ? acc_t(1) + scale[b * D + d] : acc_t(1);
      coef_a[b * D + d] = (w ? w[d] : acc_t(1)) * s;
      // (no bias: c is the shift alone, not 0 * s, which an inf scale would make NaN)
      coef_c[b * D + d] = (bias ? bias[d] * s : acc_t(0)) + (shift ? shift[b * D + d] : acc_t(0));
    }
  }
}

// What the forward's row loops read and write: inputs, outputs (null when not requested),
// the per-sample coefficients, sizes.
template <typename scalar_t>
struct FwdRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* regs;
  scalar_t* out;
  scalar_t* residual;
  acc_t* norms;
  acc_t* moments;
  acc_t* mean;
  acc_t* rstd;
  const acc_t* coef_a;
  const acc_t* coef_c;
  int64_t N, R, T, D;
  bool shared_registers, layernorm;
  acc_t eps;

  const scalar_t* row(int64_t b, int64_t t) const {
    if (t < R) return regs + (shared_registers ? t : b * R + t) * D;
    return x + (b * N + (t - R)) * D;
  }
};

struct RowSums {
  float sum, sumsq, absmax, sum4;
};

// What the backward's tasks read and write. A task is (sample b, chunk c of
// kRowsPerChunk rows); its parameter-gradient partial sums are row b * C + c of the
// partial buffers (null when not wanted), so no two threads share one, and the chunking
// does not depend on the thread count: the results do not either.
template <typename scalar_t>
struct BwdRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* regs;
  const acc_t* scale;
  const acc_t* weight;
  const acc_t* bias;
  const scalar_t* dout;
  const scalar_t* dres;
  const acc_t* mean;  // null for RMSNorm
  const acc_t* rstd;
  scalar_t* dx;
  acc_t* dregs;  // [B, R, D], per sample
  acc_t* p_shift;
  acc_t* p_scale;
  acc_t* p_w;
  acc_t* p_b;
  int64_t N, R, T, D, C;
  bool shared_registers;

  const scalar_t* row(int64_t b, int64_t t) const {
    if (t < R) return regs + (shared_registers ? t : b * R + t) * D;
    return x + (b * N + (t - R)) * D;
  }
  // The task's sample, first and last row + 1.
  void task_rows(int64_t task, int64_t& b, int64_t& t0, int64_t& t1) const {
    b = task / C;
    t0 = (task % C) * kRowsPerChunk;
    t1 = std::min(T, t0 + kRowsPerChunk);
  }
};

// Per task, the scratch rows of the backward (9 D values): xhat, gxhat, the four partial
// sums, 1 + scale[b], weight, bias.
constexpr int64_t kBwdScratchRows = 9;

// The scalar forward (double; every dtype where GCC/Clang vector extensions are missing).
template <typename scalar_t>
void fwd_rows_scalar(const FwdRows<scalar_t>& p, int64_t begin, int64_t end, at::opmath_type<scalar_t>* h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.D;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / p.T, t = row % p.T;
    const scalar_t* src = p.row(b, t);
    if (p.residual) std::copy(src, src + D, p.residual + row * D);
    acc_t sum = 0, sumsq = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t v = static_cast<acc_t>(src[d]);
      h[d] = v;
      sum += v;
      sumsq += v * v;
    }
    acc_t mean = 0, var = sumsq / D;
    if (p.layernorm) {
      mean = sum / D;
      acc_t sq = 0;
      for (int64_t d = 0; d < D; ++d) sq += (h[d] - mean) * (h[d] - mean);
      var = sq / D;
    }
    const acc_t rstd = acc_t(1) / std::sqrt(var + p.eps);
    p.rstd[row] = rstd;
    if (p.mean) p.mean[row] = mean;
    if (p.norms) p.norms[row] = std::sqrt(sumsq);
    if (p.moments) {
      acc_t absmax = 0, sum4 = 0;
      for (int64_t d = 0; d < D; ++d) {
        absmax = max_nan(absmax, std::abs(h[d]));
        sum4 += h[d] * h[d] * h[d] * h[d];
      }
      p.moments[2 * row] = absmax;
      p.moments[2 * row + 1] = sum4;
    }
    const acc_t* ca = p.coef_a + b * D;
    const acc_t* cc = p.coef_c + b * D;
    scalar_t* dst = p.out + row * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>((h[d] - mean) * rstd * ca[d] + cc[d]);
  }
}

constexpr int64_t kLanes = 16;  // float lanes of every reduction in norm_modulate_vec.h

#if defined(__GNUC__)
// The vector forward and backward, once per instruction set. fp-contract off: a
// multiply-add stays two roundings on every instruction set (the baseline has no FMA), so
// all give the same bits.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
#define DSR_VEC_NS nm_vec_default
#define DSR_VEC_BYTES 16
#include "norm_modulate_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DSR_VEC_NS nm_vec_avx2
#define DSR_VEC_BYTES 32
#include "norm_modulate_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")
#define DSR_VEC_NS nm_vec_avx512
#define DSR_VEC_BYTES 64
#include "norm_modulate_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#endif  // __x86_64__
#pragma GCC pop_options
#endif  // __GNUC__

template <typename scalar_t>
using FwdRowsFn = void (*)(const FwdRows<scalar_t>&, int64_t, int64_t, at::opmath_type<scalar_t>*);

template <typename scalar_t>
FwdRowsFn<scalar_t> fwd_rows_fn() {
#if defined(__GNUC__)
  if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(__x86_64__)
    switch (cpu_isa()) {
      case CpuIsa::Avx512:
        return nm_vec_avx512::fwd_rows<scalar_t>;
      case CpuIsa::Avx2:
        return nm_vec_avx2::fwd_rows<scalar_t>;
      default:
        break;
    }
#endif
    return nm_vec_default::fwd_rows<scalar_t>;
  }
#endif
  return fwd_rows_scalar<scalar_t>;
}

template <typename scalar_t>
void fwd_impl(const NormModulateArgs& a, NormModulateOutputs& o) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> coef_a, coef_c;
  output_coefficients(a, coef_a, coef_c);
  FwdRows<scalar_t> p;
  p.x = a.x.const_data_ptr<scalar_t>();
  p.regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  p.out = o.out.mutable_data_ptr<scalar_t>();
  p.residual = o.residual.defined() ? o.residual.mutable_data_ptr<scalar_t>() : nullptr;
  p.norms = o.norms.defined() ? o.norms.mutable_data_ptr<acc_t>() : nullptr;
  p.moments = o.moments.defined() ? o.moments.mutable_data_ptr<acc_t>() : nullptr;
  p.mean = o.mean.defined() ? o.mean.mutable_data_ptr<acc_t>() : nullptr;
  p.rstd = o.rstd.mutable_data_ptr<acc_t>();
  p.coef_a = coef_a.data();
  p.coef_c = coef_c.data();
  p.N = a.N;
  p.R = a.R;
  p.T = a.tokens();
  p.D = a.D;
  p.shared_registers = a.shared_registers;
  p.layernorm = a.kind == NormKind::LayerNorm;
  p.eps = static_cast<acc_t>(a.eps);
  const FwdRowsFn<scalar_t> rows = fwd_rows_fn<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.D, 1));
  at::parallel_for(0, a.B * p.T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(a.D);  // the row as acc_t (half / bfloat16 / double rows)
    rows(p, begin, end, buf.data());
  });
}

// The scalar backward (double; every dtype where GCC/Clang vector extensions are missing).
template <typename scalar_t>
void bwd_tasks_scalar(const BwdRows<scalar_t>& p, int64_t begin, int64_t end, at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.D;
  acc_t *xhat = scratch, *gx = xhat + D, *s_shift = gx + D, *s_scale = s_shift + D, *s_w = s_scale + D,
        *s_b = s_w + D, *ops = s_b + D, *w = ops + D, *bias = w + D;
  for (int64_t d = 0; d < D; ++d) {
    w[d] = p.weight ? p.weight[d] : acc_t(1);
    bias[d] = p.bias ? p.bias[d] : acc_t(0);
  }
  for (int64_t task = begin; task < end; ++task) {
    int64_t b, t0, t1;
    p.task_rows(task, b, t0, t1);
    std::fill(s_shift, s_shift + 4 * D, acc_t(0));
    for (int64_t d = 0; d < D; ++d) ops[d] = p.scale ? acc_t(1) + p.scale[b * D + d] : acc_t(1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = b * p.T + t;
      const scalar_t* src = p.row(b, t);
      const scalar_t* g_row = p.dout + row * D;
      const acc_t mu = p.mean ? p.mean[row] : acc_t(0), r = p.rstd[row];
      // Pass 1: xhat, gxhat = dout (1 + scale) w, the two row sums and the parameter partials.
      acc_t c1 = 0, c2 = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t xh = (static_cast<acc_t>(src[d]) - mu) * r;
        const acc_t gd = static_cast<acc_t>(g_row[d]);
        const acc_t gy = gd * ops[d];
        s_shift[d] += gd;
        s_scale[d] += gd * (xh * w[d] + bias[d]);
        s_w[d] += gy * xh;
        s_b[d] += gy;
        const acc_t gxh = gy * w[d];
        xhat[d] = xh;
        gx[d] = gxh;
        c1 += gxh;
        c2 += gxh * xh;
      }
      c1 = p.mean ? c1 / D : acc_t(0);
      c2 /= D;
      // Pass 2: dh = rstd (gxhat - c1 - xhat c2) + dresidual.
      const scalar_t* dr = p.dres ? p.dres + row * D : nullptr;
      for (int64_t d = 0; d < D; ++d) {
        acc_t dh = r * (gx[d] - c1 - xhat[d] * c2);
        if (dr) dh += static_cast<acc_t>(dr[d]);
        if (t < p.R) {
          p.dregs[(b * p.R + t) * D + d] = dh;
        } else {
          p.dx[(b * p.N + t - p.R) * D + d] = static_cast<scalar_t>(dh);
        }
      }
    }
    acc_t* partials[4] = {p.p_shift, p.p_scale, p.p_w, p.p_b};
    for (int k = 0; k < 4; ++k)
      if (partials[k]) std::copy(s_shift + k * D, s_shift + (k + 1) * D, partials[k] + task * D);
  }
}

template <typename scalar_t>
using BwdTasksFn = void (*)(const BwdRows<scalar_t>&, int64_t, int64_t, at::opmath_type<scalar_t>*);

template <typename scalar_t>
BwdTasksFn<scalar_t> bwd_tasks_fn() {
#if defined(__GNUC__)
  if constexpr (!std::is_same_v<scalar_t, double>) {
#if defined(__x86_64__)
    switch (cpu_isa()) {
      case CpuIsa::Avx512:
        return nm_vec_avx512::bwd_tasks<scalar_t>;
      case CpuIsa::Avx2:
        return nm_vec_avx2::bwd_tasks<scalar_t>;
      default:
        break;
    }
#endif
    return nm_vec_default::bwd_tasks<scalar_t>;
  }
#endif
  return bwd_tasks_scalar<scalar_t>;
}

template <typename scalar_t>
void bwd_impl(const NormModulateArgs& a, const at::Tensor& dout, const at::Tensor& dres, const at::Tensor& mean,
              const at::Tensor& rstd, NormModulateGrads& g) {
  using acc_t = at::opmath_type<scalar_t>;
  auto opt = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
  auto opt_mut = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<acc_t>() : nullptr; };
  BwdRows<scalar_t> p;
  p.x = a.x.const_data_ptr<scalar_t>();
  p.regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  p.scale = opt(a.scale);
  p.weight = opt(a.weight);
  p.bias = opt(a.bias);
  p.dout = dout.const_data_ptr<scalar_t>();
  p.dres = dres.defined() ? dres.const_data_ptr<scalar_t>() : nullptr;
  p.mean = a.kind == NormKind::LayerNorm ? mean.const_data_ptr<acc_t>() : nullptr;
  p.rstd = rstd.const_data_ptr<acc_t>();
  p.dx = g.dx.mutable_data_ptr<scalar_t>();
  p.dregs = opt_mut(g.dregisters);
  p.p_shift = opt_mut(g.dshift_partial);
  p.p_scale = opt_mut(g.dscale_partial);
  p.p_w = opt_mut(g.dweight_partial);
  p.p_b = opt_mut(g.dbias_partial);
  p.N = a.N;
  p.R = a.R;
  p.T = a.tokens();
  p.D = a.D;
  p.C = chunks_per_sample(p.T);
  p.shared_registers = a.shared_registers;
  const BwdTasksFn<scalar_t> tasks = bwd_tasks_fn<scalar_t>();
  at::parallel_for(0, a.B * p.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kBwdScratchRows * a.D);
    tasks(p, begin, end, scratch.data());
  });
}

}  // namespace

void norm_modulate_fwd_cpu(const NormModulateArgs& args, NormModulateOutputs& outputs) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "norm_modulate_fwd_cpu",
                                  [&] { fwd_impl<scalar_t>(args, outputs); });
}

void norm_modulate_bwd_cpu(const NormModulateArgs& args, const at::Tensor& dout, const at::Tensor& dresidual,
                           const at::Tensor& mean, const at::Tensor& rstd, NormModulateGrads& grads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "norm_modulate_bwd_cpu",
                                  [&] { bwd_impl<scalar_t>(args, dout, dresidual, mean, rstd, grads); });
}

}  // namespace dsr_kernels
