// CPU kernel of ttr_activation: GELU of the fc1 output with the test-time register
// neurons redirected, in one pass over the activation (see ttr_activation.h and the
// comment above fwd_impl).
//
// The GELU itself is vectorised with GCC/Clang vector extensions and compiled three
// times (baseline x86-64, AVX2 + FMA, AVX-512); the instruction set is picked once at
// run time (cpu_capability.h: DSR_CPU_CAPABILITY=default|avx2|avx512 caps it). erf is
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the approximation ATen's own
// vectorised GELU uses) with a Cephes-style exp, so the result is as accurate as eager
// PyTorch's float32 GELU. Half and bfloat16 rows are converted to float once, through a
// per-thread row buffer; double runs the exact scalar formula.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dsr_kernels/cpu_capability.h"
#include "dsr_kernels/ttr_activation.h"

namespace dsr_kernels {
namespace {

// ----------------------------------------------------------------------------- scalar forms

inline double gelu_scalar(double x, bool tanh_form) {
  if (tanh_form) return 0.5 * x * (1.0 + std::tanh(0.79788456080286536 * (x + 0.044715 * x * x * x)));
  return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752));
}

#if defined(__GNUC__)
// ----------------------------------------------------------------------------- vector forms
// ttr_activation_vec.h holds the vector GELU; it is compiled once per instruction set,
// each copy in its own namespace under a `#pragma GCC target` region.
#define DSR_VEC_NS vec_default
#define DSR_VEC_BYTES 16
#include "ttr_activation_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DSR_VEC_NS vec_avx2
#define DSR_VEC_BYTES 32
#include "ttr_activation_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#define DSR_VEC_NS vec_avx512
#define DSR_VEC_BYTES 64
#include "ttr_activation_vec.h"
#undef DSR_VEC_NS
#undef DSR_VEC_BYTES
#pragma GCC pop_options
#endif
void gelu_row_default(const float* x, float* y, int64_t n, bool tanh_form) { vec_default::gelu_row(x, y, n, tanh_form); }
#if defined(__x86_64__)
void gelu_row_avx2(const float* x, float* y, int64_t n, bool tanh_form) { vec_avx2::gelu_row(x, y, n, tanh_form); }
void gelu_row_avx512(const float* x, float* y, int64_t n, bool tanh_form) { vec_avx512::gelu_row(x, y, n, tanh_form); }
#endif
#else   // no vector extensions: the exact scalar formula
void gelu_row_default(const float* x, float* y, int64_t n, bool tanh_form) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(gelu_scalar(x[i], tanh_form));
}
#endif  // __GNUC__

using GeluRowFn = void (*)(const float*, float*, int64_t, bool);

GeluRowFn pick_gelu_row() {
#if defined(__GNUC__) && defined(__x86_64__)
  switch (cpu_isa()) {
    case CpuIsa::Avx512:
      return gelu_row_avx512;
    case CpuIsa::Avx2:
      return gelu_row_avx2;
    default:
      break;
  }
#endif
  return gelu_row_default;
}

GeluRowFn gelu_row() {
  static const GeluRowFn fn = pick_gelu_row();
  return fn;
}

// GELU of n values into float (float, half and bfloat16 inputs).
template <typename scalar_t>
void gelu_to_float(const scalar_t* x, float* y, int64_t n, bool tanh_form) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    gelu_row()(x, y, n, tanh_form);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(x[i]);
    gelu_row()(y, y, n, tanh_form);
  }
}

// ----------------------------------------------------------------------------- the op
//
// One pass over h, rows split over threads: each row's GELU is computed into the output
// (a float row buffer for half / bfloat16), its K selected activations are copied, while
// the row is in L1, into a compact [B, T, K] buffer, and for "zero" the selected columns
// of a patch row are cleared before the row is stored. Then the per-(image, neuron)
// values come from the compact buffer (contiguous: no strided column reads of h), and
// only the register rows (and, for "mean" / "only_outliers", the patch rows' selected
// columns) are written again: R x K (or T x K) elements per image.

template <typename acc_t>
acc_t signed_max(acc_t hi, acc_t lo) {
  return hi >= -lo ? hi : lo;
}

// max / min that propagate NaN, as torch.amax / amin do (std::max(a, NaN) would drop it).
template <typename acc_t>
acc_t nan_max(acc_t a, acc_t b) {
  return (std::isnan(a) || b > a || std::isnan(b)) && !std::isnan(a) ? b : a;
}
template <typename acc_t>
acc_t nan_min(acc_t a, acc_t b) {
  return (std::isnan(a) || b < a || std::isnan(b)) && !std::isnan(a) ? b : a;
}

// The order of torch.sort: NaN after every number.
template <typename acc_t>
bool less_nan_last(acc_t a, acc_t b) {
  return std::isnan(b) ? !std::isnan(a) : a < b;
}

// reg / fill / thresh [B, K] from the compact activations cols [B, T, K].
template <typename acc_t>
void column_values(const TtrActivationArgs& a, const acc_t* cols, TtrColumnValues& v) {
  const int64_t B = a.B, T = a.T, K = a.K, p0 = a.prefix, p1 = a.patch_end(), P = p1 - p0;
  acc_t* reg = v.reg.mutable_data_ptr<acc_t>();
  acc_t* fill = v.fill.mutable_data_ptr<acc_t>();
  acc_t* thresh = v.thresh.mutable_data_ptr<acc_t>();
  std::vector<acc_t> hi(B * K), lo(B * K);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> patch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, k = task % K;
      const acc_t* col = cols + b * T * K + k;  // stride K
      acc_t mx = -inf, mn = inf;
      for (int64_t t = 0; t < T; ++t) {
        mx = nan_max(mx, col[t * K]);
        mn = nan_min(mn, col[t * K]);
      }
      hi[task] = mx;
      lo[task] = mn;
      reg[task] = a.register_value == RegisterValue::Max ? mx : signed_max(mx, mn);
      acc_t f = 0, th = -inf;
      if (a.patch_values == PatchValues::Mean && P > 0) {
        patch.resize(P);
        for (int64_t t = 0; t < P; ++t) patch[t] = col[(p0 + t) * K];
        const int64_t m = bottom_mean_count(P);
        // (NaN sorts last, as in the reference's torch.sort: a NaN enters the mean only
        // when fewer than m patches are numbers)
        std::nth_element(patch.begin(), patch.begin() + m - 1, patch.end(), less_nan_last<acc_t>);
        double s = 0;  // after nth_element the m smallest are the first m, in some order
        for (int64_t t = 0; t < m; ++t) s += patch[t];
        f = static_cast<acc_t>(s / m);
      } else if (a.patch_values == PatchValues::OnlyOutliers && P > 0) {
        double s = 0;
        for (int64_t t = p0; t < p1; ++t) s += col[t * K];
        const double mean = s / P;
        double ss = 0;
        for (int64_t t = p0; t < p1; ++t) ss += (col[t * K] - mean) * (col[t * K] - mean);
        // Unbiased, as torch.std: NaN for a single patch, which then replaces nothing.
        const double sd = P > 1 ? std::sqrt(ss / (P - 1)) : std::numeric_limits<double>::quiet_NaN();
        f = static_cast<acc_t>(mean);
        th = static_cast<acc_t>(mean + sd);
      } else if (a.patch_values == PatchValues::Same) {
        th = inf;
      }
      fill[task] = f;
      thresh[task] = th;
    }
  });
  if (a.register_value == RegisterValue::LayerSignedMax) {
    for (int64_t b = 0; b < B; ++b) {
      acc_t mx = -inf, mn = inf;
      for (int64_t k = 0; k < K; ++k) {
        mx = nan_max(mx, hi[b * K + k]);
        mn = nan_min(mn, lo[b * K + k]);
      }
      for (int64_t k = 0; k < K; ++k) reg[b * K + k] = signed_max(mx, mn);
    }
  }
}

template <typename scalar_t, typename acc_t>
void fwd_impl(const TtrActivationArgs& a, TtrColumnValues& v, at::Tensor& out_t) {
  const int64_t B = a.B, T = a.T, F = a.F, K = a.K, p0 = a.prefix, p1 = a.patch_end();
  const scalar_t* h = a.h.const_data_ptr<scalar_t>();
  scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
  const int64_t* neurons = K ? a.neurons.const_data_ptr<int64_t>() : nullptr;
  const bool zero_patches = a.patch_values == PatchValues::Zero;
  std::vector<acc_t> cols(B * T * K);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : F);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* src = h + row * F;
      scalar_t* dst = out + row * F;
      acc_t* act = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(dst) : buf.data();
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t f = 0; f < F; ++f) act[f] = gelu_scalar(src[f], a.tanh);
      } else {
        gelu_to_float(src, act, F, a.tanh);
      }
      if (K) {
        acc_t* c = cols.data() + row * K;
        for (int64_t k = 0; k < K; ++k) c[k] = act[neurons[k]];
        const int64_t t = row % T;
        if (zero_patches && t >= p0 && t < p1) {
          for (int64_t k = 0; k < K; ++k) act[neurons[k]] = acc_t(0);
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t f = 0; f < F; ++f) dst[f] = static_cast<scalar_t>(buf[f]);
      }
    }
  });
  if (!K) return;
  column_values<acc_t>(a, cols.data(), v);
  const acc_t* reg = v.reg.const_data_ptr<acc_t>();
  const acc_t* fill = v.fill.const_data_ptr<acc_t>();
  const acc_t* thresh = v.thresh.const_data_ptr<acc_t>();
  const bool rewrite_patches =
      a.patch_values == PatchValues::Mean || a.patch_values == PatchValues::OnlyOutliers;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = rewrite_patches ? p0 : p1; t < T; ++t) {
        scalar_t* dst = out + (b * T + t) * F;
        const acc_t* c = cols.data() + (b * T + t) * K;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = b * K + k;
          if (t >= p1) {
            dst[neurons[k]] = static_cast<scalar_t>(reg[s]);
          } else if (a.patch_values == PatchValues::Mean || c[k] > thresh[s]) {
            dst[neurons[k]] = static_cast<scalar_t>(fill[s]);
          }
        }
      }
    }
  });
}

}  // namespace

void ttr_activation_cpu(const TtrActivationArgs& args, TtrColumnValues& values, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.h.scalar_type(), "ttr_activation_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(args, values, out);
  });
}

}  // namespace dsr_kernels
