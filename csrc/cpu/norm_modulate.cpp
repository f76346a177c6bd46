// CPU kernels of norm_modulate: rows (tokens) split over threads by at::parallel_for,
// inner loops over channels vectorised (`omp simd`), float accumulation for fp16/bf16.
//
// Forward, per row: one pass converts the row into a thread-local float buffer while
// summing it, a second (LayerNorm) takes the centred variance from that buffer (in L1:
// D = 1152 floats is 4.5 KiB), a third writes out = (h - mean) * rstd * a + c with the
// per-sample coefficients a = w (1 + scale), c = bias (1 + scale) + shift.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dsr_kernels/norm_modulate.h"

namespace dsr_kernels {
namespace {

// Source row t of sample b in [registers ; x].
template <typename scalar_t>
inline const scalar_t* token_row(const NormModulateArgs& a, const scalar_t* x, const scalar_t* regs, int64_t b,
                                 int64_t t) {
  if (t < a.R) return regs + (a.shared_registers ? t : b * a.R + t) * a.D;
  return x + (b * a.N + (t - a.R)) * a.D;
}

// Per-sample coefficients of the fused output: out = (h - mean) * rstd * a + c with
// a = weight * (1 + scale[b]) and c = bias * (1 + scale[b]) + shift[b]. [B, D] each,
// computed once per call, so the per-row output is one fused multiply-add pass.
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
      coef_c[b * D + d] = (bias ? bias[d] : acc_t(0)) * s + (shift ? shift[b * D + d] : acc_t(0));
    }
  }
}

template <typename scalar_t>
void fwd_impl(const NormModulateArgs& a, NormModulateOutputs& o) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = a.tokens(), D = a.D;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = o.out.mutable_data_ptr<scalar_t>();
  scalar_t* residual = o.residual.defined() ? o.residual.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* norms = o.norms.defined() ? o.norms.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* moments = o.moments.defined() ? o.moments.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* mean_out = o.mean.defined() ? o.mean.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* rstd_out = o.rstd.mutable_data_ptr<acc_t>();
  const bool layernorm = a.kind == NormKind::LayerNorm;
  const acc_t eps = static_cast<acc_t>(a.eps);
  std::vector<acc_t> coef_a, coef_c;
  output_coefficients(a, coef_a, coef_c);

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, a.B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(D);
    acc_t* h = buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const scalar_t* src = token_row(a, x, regs, b, t);
      if (residual) std::copy(src, src + D, residual + row * D);
      // Pass 1: convert once, sum and sum of squares.
      acc_t sum = 0, sumsq = 0;
#pragma omp simd reduction(+ : sum, sumsq)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t v = static_cast<acc_t>(src[d]);
        h[d] = v;
        sum += v;
        sumsq += v * v;
      }
      acc_t mean = 0, var = sumsq / D;
      if (layernorm) {
        mean = sum / D;
        acc_t sq = 0;  // pass 2 over the row, now in L1: exact even when |mean| >> std
#pragma omp simd reduction(+ : sq)
        for (int64_t d = 0; d < D; ++d) sq += (h[d] - mean) * (h[d] - mean);
        var = sq / D;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
      rstd_out[row] = rstd;
      if (mean_out) mean_out[row] = mean;
      if (norms) norms[row] = std::sqrt(sumsq);
      if (moments) {
        acc_t absmax = 0, sum4 = 0;
#pragma omp simd reduction(max : absmax) reduction(+ : sum4)
        for (int64_t d = 0; d < D; ++d) {
          absmax = std::max(absmax, std::abs(h[d]));
          sum4 += h[d] * h[d] * h[d] * h[d];
        }
        moments[2 * row] = absmax;
        moments[2 * row + 1] = sum4;
      }
      // Pass 3: out = (h - mean) * rstd * a + c, one fused pass.
      const acc_t* ca = coef_a.data() + b * D;
      const acc_t* cc = coef_c.data() + b * D;
      scalar_t* dst = out + row * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>((h[d] - mean) * rstd * ca[d] + cc[d]);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const NormModulateArgs& a, const at::Tensor& dout_t, const at::Tensor& dres_t, const at::Tensor& mean_t,
              const at::Tensor& rstd_t, NormModulateGrads& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = a.tokens(), D = a.D, C = chunks_per_sample(T);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* scale = a.scale.defined() ? a.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* w = a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bias = a.bias.defined() ? a.bias.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* dout = dout_t.const_data_ptr<scalar_t>();
  const scalar_t* dres = dres_t.defined() ? dres_t.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* mean = mean_t.defined() ? mean_t.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rstd = rstd_t.const_data_ptr<acc_t>();
  scalar_t* dx = g.dx.mutable_data_ptr<scalar_t>();
  acc_t* dregs = a.R ? g.dregisters.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* p_shift = g.dshift_partial.defined() ? g.dshift_partial.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* p_scale = g.dscale_partial.defined() ? g.dscale_partial.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* p_w = g.dweight_partial.defined() ? g.dweight_partial.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* p_b = g.dbias_partial.defined() ? g.dbias_partial.mutable_data_ptr<acc_t>() : nullptr;
  const bool layernorm = a.kind == NormKind::LayerNorm;
  const bool any_partial = p_shift || p_scale || p_w || p_b;

  // One task per (sample, chunk of rows): the chunk's partial sums of the parameter
  // gradients are its own row of the partial buffers, so no two threads share one, and
  // the chunking does not depend on the thread count (deterministic results).
  at::parallel_for(0, a.B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xhat(D), gx(D), ops(4 * D), one_plus_scale(D, acc_t(1)), wv(D, acc_t(1)), bv(D, acc_t(0));
    acc_t* s_shift = ops.data();
    acc_t* s_scale = s_shift + D;
    acc_t* s_w = s_scale + D;
    acc_t* s_b = s_w + D;
    if (w) std::copy(w, w + D, wv.begin());
    if (bias) std::copy(bias, bias + D, bv.begin());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, c = task % C;
      const int64_t t0 = c * kRowsPerChunk, t1 = std::min(T, t0 + kRowsPerChunk);
      std::fill(ops.begin(), ops.end(), acc_t(0));
      if (scale) {
        for (int64_t d = 0; d < D; ++d) one_plus_scale[d] = acc_t(1) + scale[b * D + d];
      }
      const acc_t* ops_ = one_plus_scale.data();
      const acc_t* w_ = wv.data();
      const acc_t* b_ = bv.data();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = b * T + t;
        const scalar_t* src = token_row(a, x, regs, b, t);
        const scalar_t* g_row = dout + row * D;
        const acc_t mu = layernorm ? mean[row] : acc_t(0), r = rstd[row];
        // Pass 1: xhat, gxhat = dout (1 + scale) w, the two row sums and the parameter partials.
        acc_t c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
        for (int64_t d = 0; d < D; ++d) {
          const acc_t xh = (static_cast<acc_t>(src[d]) - mu) * r;
          const acc_t gd = static_cast<acc_t>(g_row[d]);
          const acc_t gy = gd * ops_[d];
          s_shift[d] += gd;
          s_scale[d] += gd * (xh * w_[d] + b_[d]);
          s_w[d] += gy * xh;
          s_b[d] += gy;
          const acc_t gxh = gy * w_[d];
          xhat[d] = xh;
          gx[d] = gxh;
          c1 += gxh;
          c2 += gxh * xh;
        }
        c1 = layernorm ? c1 / D : acc_t(0);
        c2 /= D;
        // Pass 2: dh = rstd (gxhat - c1 - xhat c2) + dresidual.
        const scalar_t* dr = dres ? dres + row * D : nullptr;
        if (t < a.R) {
          acc_t* dst = dregs + (b * a.R + t) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d)
            dst[d] = r * (gx[d] - c1 - xhat[d] * c2) + (dr ? static_cast<acc_t>(dr[d]) : acc_t(0));
        } else {
          scalar_t* dst = dx + (b * a.N + t - a.R) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d)
            dst[d] = static_cast<scalar_t>(r * (gx[d] - c1 - xhat[d] * c2) +
                                           (dr ? static_cast<acc_t>(dr[d]) : acc_t(0)));
        }
      }
      if (any_partial) {
        const int64_t part = task * D;
        if (p_shift) std::copy(s_shift, s_shift + D, p_shift + part);
        if (p_scale) std::copy(s_scale, s_scale + D, p_scale + part);
        if (p_w) std::copy(s_w, s_w + D, p_w + part);
        if (p_b) std::copy(s_b, s_b + D, p_b + part);
      }
    }
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
