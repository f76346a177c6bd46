// CPU kernels of norm_modulate: one row (token) per iteration of at::parallel_for,
// vectorised inner loops (at::vec), float accumulation for fp16/bf16.
//
// Each row is converted once into a thread-local buffer in the accumulation type; the
// statistics, the normalisation and the modulation are then short vector loops over
// that buffer, which stays in L1 (D = 1152 floats is 4.5 KiB).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dsr_kernels/norm_modulate.h"

namespace dsr_kernels {
namespace {

template <typename acc_t, typename scalar_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

template <typename acc_t>
inline acc_t row_sum(const acc_t* a, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, a, n);
}

template <typename acc_t>
inline acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::map2_reduce_all<acc_t>([](Vec x, Vec y) { return x * y; },
                                         [](Vec x, Vec y) { return x + y; }, a, b, n);
}

// Source row t of sample b in [registers ; x].
template <typename scalar_t>
inline const scalar_t* token_row(const NormModulateArgs& a, const scalar_t* x, const scalar_t* regs, int64_t b,
                                 int64_t t) {
  if (t < a.R) return regs + (a.shared_registers ? t : b * a.R + t) * a.D;
  return x + (b * a.N + (t - a.R)) * a.D;
}

// y = norm(h) * weight + bias in place, from h's statistics.
template <typename acc_t>
inline void normalise(acc_t* h, int64_t D, acc_t mean, acc_t rstd, const acc_t* w, const acc_t* bias) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vmean(mean), vrstd(rstd);
  at::vec::map([=](Vec v) { return (v - vmean) * vrstd; }, h, h, D);
  if (w) at::vec::map2([](Vec v, Vec g) { return v * g; }, h, h, w, D);
  if (bias) at::vec::map2([](Vec v, Vec c) { return v + c; }, h, h, bias, D);
}

template <typename scalar_t>
void fwd_impl(const NormModulateArgs& a, NormModulateOutputs& o) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t T = a.tokens(), D = a.D;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* shift = a.shift.defined() ? a.shift.const_data_ptr<acc_t>() : nullptr;
  const acc_t* scale = a.scale.defined() ? a.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* w = a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bias = a.bias.defined() ? a.bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* out = o.out.mutable_data_ptr<scalar_t>();
  scalar_t* residual = o.residual.defined() ? o.residual.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* norms = o.norms.defined() ? o.norms.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* moments = o.moments.defined() ? o.moments.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* mean_out = o.mean.defined() ? o.mean.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* rstd_out = o.rstd.mutable_data_ptr<acc_t>();
  const bool layernorm = a.kind == NormKind::LayerNorm;
  const acc_t eps = static_cast<acc_t>(a.eps);

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, a.B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(D), one_plus_scale(scale ? D : 0);
    acc_t* h = buf.data();
    int64_t cached_b = -1;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const scalar_t* src = token_row(a, x, regs, b, t);
      load_row(src, h, D);
      if (residual) std::copy(src, src + D, residual + row * D);

      const acc_t sumsq = row_dot(h, h, D);
      acc_t mean = 0, var;
      if (layernorm) {
        mean = row_sum(h, D) / D;
        // Two passes over a row that sits in L1: exact even when |mean| >> std.
        const Vec vmean(mean);
        var = at::vec::map_reduce_all<acc_t>([=](Vec v) { return (v - vmean) * (v - vmean); },
                                             [](Vec p, Vec q) { return p + q; }, h, D) /
              D;
      } else {
        var = sumsq / D;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
      rstd_out[row] = rstd;
      if (mean_out) mean_out[row] = mean;
      if (norms) norms[row] = std::sqrt(sumsq);
      if (moments) {
        acc_t absmax = 0, sum4 = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t v2 = h[d] * h[d];
          absmax = std::max(absmax, std::abs(h[d]));
          sum4 += v2 * v2;
        }
        moments[2 * row] = absmax;
        moments[2 * row + 1] = sum4;
      }

      normalise(h, D, mean, rstd, w, bias);
      if (scale) {
        if (b != cached_b) {  // (1 + scale[b]) once per sample, not per row
          at::vec::map([](Vec s) { return s + Vec(1); }, one_plus_scale.data(), scale + b * D, D);
          cached_b = b;
        }
        at::vec::map2([](Vec v, Vec s) { return v * s; }, h, h, one_plus_scale.data(), D);
      }
      if (shift) at::vec::map2([](Vec v, Vec s) { return v + s; }, h, h, shift + b * D, D);
      store_row(h, out + row * D, D);
    }
  });
}

template <typename scalar_t>
void bwd_impl(const NormModulateArgs& a, const at::Tensor& dout_t, const at::Tensor& dres_t, const at::Tensor& mean_t,
              const at::Tensor& rstd_t, NormModulateGrads& g) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
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

  // One task per (sample, chunk of rows): the chunk's partial sums of the parameter
  // gradients are its own row of the partial buffers, so no two threads share one.
  at::parallel_for(0, a.B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xhat(D), gy(D), y(D), tmp(D), one_plus_scale(scale ? D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / C, c = task % C;
      const int64_t t0 = c * kRowsPerChunk, t1 = std::min(T, t0 + kRowsPerChunk);
      const int64_t part = task * D;
      if (p_shift) std::fill(p_shift + part, p_shift + part + D, acc_t(0));
      if (p_scale) std::fill(p_scale + part, p_scale + part + D, acc_t(0));
      if (p_w) std::fill(p_w + part, p_w + part + D, acc_t(0));
      if (p_b) std::fill(p_b + part, p_b + part + D, acc_t(0));
      if (scale) at::vec::map([](Vec s) { return s + Vec(1); }, one_plus_scale.data(), scale + b * D, D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = b * T + t;
        load_row(token_row(a, x, regs, b, t), xhat.data(), D);
        const acc_t mu = layernorm ? mean[row] : acc_t(0), r = rstd[row];
        normalise(xhat.data(), D, mu, r, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr));
        load_row(dout + row * D, gy.data(), D);  // gy = dout for now
        if (p_shift) at::vec::map2([](Vec s, Vec v) { return s + v; }, p_shift + part, p_shift + part, gy.data(), D);
        if (p_scale) {  // d scale = sum dout * y, y = xhat * w + bias
          std::copy(xhat.begin(), xhat.end(), y.begin());
          if (w) at::vec::map2([](Vec v, Vec q) { return v * q; }, y.data(), y.data(), w, D);
          if (bias) at::vec::map2([](Vec v, Vec q) { return v + q; }, y.data(), y.data(), bias, D);
          at::vec::map3([](Vec s, Vec d, Vec v) { return s + d * v; }, p_scale + part, p_scale + part, gy.data(),
                        y.data(), D);
        }
        if (scale) at::vec::map2([](Vec v, Vec s) { return v * s; }, gy.data(), gy.data(), one_plus_scale.data(), D);
        if (p_w) at::vec::map3([](Vec s, Vec d, Vec v) { return s + d * v; }, p_w + part, p_w + part, gy.data(),
                               xhat.data(), D);
        if (p_b) at::vec::map2([](Vec s, Vec d) { return s + d; }, p_b + part, p_b + part, gy.data(), D);
        // gxhat = gy * w; dh = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat))
        if (w) at::vec::map2([](Vec v, Vec q) { return v * q; }, gy.data(), gy.data(), w, D);
        const acc_t c1 = layernorm ? row_sum(gy.data(), D) / D : acc_t(0);
        const acc_t c2 = row_dot(gy.data(), xhat.data(), D) / D;
        const Vec vc1(c1), vc2(c2), vr(r);
        at::vec::map2([=](Vec gx, Vec xh) { return vr * (gx - vc1 - xh * vc2); }, tmp.data(), gy.data(),
                      xhat.data(), D);
        if (dres) {
          const scalar_t* dr = dres + row * D;
          for (int64_t d = 0; d < D; ++d) tmp[d] += static_cast<acc_t>(dr[d]);
        }
        if (t < a.R) {
          std::copy(tmp.begin(), tmp.end(), dregs + (b * a.R + t) * D);
        } else {
          store_row(tmp.data(), dx + (b * a.N + t - a.R) * D, D);
        }
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
