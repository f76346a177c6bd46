// The vector GELU of csrc/cpu/ttr_activation.cpp, included there once per instruction set
// (each time under a `#pragma GCC target` region, with DSR_VEC_NS naming the namespace and
// DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2, 64 AVX-512). Not a standalone header.
//
// GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <=
// 1.5e-7: the approximation ATen's vectorised GELU uses), exp by vec_base.h's
// exp_nonpositive; the tanh form as 0.5 x (1 + tanh(u)), tanh(u) = sign(u) (1 - e) / (1 + e)
// with e = exp(-2 |u|).
namespace DSR_VEC_NS {

#include "vec_base.h"

inline F with_sign_of(F x, F sign) { return as_float(as_int(x) ^ (as_int(sign) & int32_t(0x80000000u))); }

// 1 / x. The vector division is the slowest instruction here (on AMD Zen 4 one AVX-512
// division issues every ~10 cycles), so AVX2 / AVX-512 take the hardware estimate and one
// Newton step: relative error ~1e-7, below the A&S erf's.
// (x = inf: the estimate is 0 and the Newton step 0 * (2 - inf * 0) would be NaN: 0 is kept.)
inline F reciprocal(F x) {
#if DSR_VEC_BYTES == 64
  const F r = _mm512_rcp14_ps(x);
  return as_float(as_int(r * (splat(2.0f) - x * r)) & ~(r == splat(0.0f)));
#elif DSR_VEC_BYTES == 32
  const F r = _mm256_rcp_ps(x);
  return as_float(as_int(r * (splat(2.0f) - x * r)) & ~(r == splat(0.0f)));
#else
  return splat(1.0f) / x;
#endif
}

inline F gelu(F x, bool tanh_form) {
  if (tanh_form) {
    const F u = splat(0.79788456080286536f) * (x + splat(0.044715f) * x * x * x);
    const F e = exp_nonpositive(splat(-2.0f) * abs_value(u));
    const F t = with_sign_of((splat(1.0f) - e) * reciprocal(splat(1.0f) + e), u);
    return splat(0.5f) * x * (splat(1.0f) + t);
  }
  const F az = abs_value(x * splat(0.70710678118654752f));
  const F t = reciprocal(splat(1.0f) + splat(0.3275911f) * az);
  F p = splat(1.061405429f);
  p = p * t + splat(-1.453152027f);
  p = p * t + splat(1.421413741f);
  p = p * t + splat(-0.284496736f);
  p = p * t + splat(0.254829592f);
  const F e = with_sign_of(splat(1.0f) - p * t * exp_nonpositive(-(az * az)), x);
  return splat(0.5f) * x * (splat(1.0f) + e);
}

// y[0:n] = gelu(x[0:n]); the tail runs through the same vector code, so every element is
// computed alike wherever it sits in a row.
inline void gelu_row(const float* x, float* y, int64_t n, bool tanh_form) {
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {  // two independent vectors per iteration
    F v0, v1;
    std::memcpy(&v0, x + i, W);
    std::memcpy(&v1, x + i + L, W);
    v0 = gelu(v0, tanh_form);
    v1 = gelu(v1, tanh_form);
    std::memcpy(y + i, &v0, W);
    std::memcpy(y + i + L, &v1, W);
  }
  for (; i < n; i += L) {
    const int64_t m = std::min<int64_t>(L, n - i);
    F v{};
    std::memcpy(&v, x + i, m * sizeof(float));
    v = gelu(v, tanh_form);
    std::memcpy(y + i, &v, m * sizeof(float));
  }
}

}  // namespace DSR_VEC_NS
