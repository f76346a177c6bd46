// The row operations of csrc/cpu/attention.cpp, included there once per instruction set
// (each time under a `#pragma GCC target` region, with DSR_VEC_NS naming the namespace and
// DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2, 64 AVX-512). Not a standalone header.
//
// exp by vec_base.h's exp_or_zero: every exponent here is a logit minus the row's max or
// its log-sum-exp (<= 0), and masked keys (-inf) give exactly 0.
namespace DSR_VEC_NS {

#include "vec_base.h"

inline F load(const float* p, int64_t n, float fill) {  // n < L lanes, the rest = fill
  F v = splat(fill);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// The row's max; NaN when any element is NaN (a NaN logit poisons its row, whichever
// lane it sits in: the max instructions alone would keep or drop it by position).
inline float row_max(const float* s, int64_t n) {
  F m = splat(-std::numeric_limits<float>::infinity());
  I nan = I{};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, s + j, W);
    m = maximum(m, v);
    nan |= v != v;
  }
  if (j < n) {
    const F v = load(s + j, n - j, -std::numeric_limits<float>::infinity());
    m = maximum(m, v);
    nan |= v != v;
  }
  for (int64_t l = 0; l < L; ++l)
    if (nan[l]) return std::numeric_limits<float>::quiet_NaN();
  return hmax(m);
}

// s[j] <- exp(s[j] - shift) in place; returns sum_j e_j and (want_es) sum_j e_j (s_j - shift),
// the shifted form of the entropy's sum, which does not cancel at large logits (masked keys,
// s = -inf, give e = 0 and add nothing: s - shift is clamped to -FLT_MAX for the product).
inline void exp_row(float* s, int64_t n, float shift, bool want_es, float* sum_e, float* sum_es) {
  F acc = splat(0.0f), acc_es = splat(0.0f);
  const F sh = splat(shift), lo = splat(-std::numeric_limits<float>::max());
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, s + j, W);
    const F x = v - sh;
    const F e = exp_or_zero(x);
    acc += e;
    if (want_es) acc_es += e * maximum(x, lo);
    std::memcpy(s + j, &e, W);
  }
  if (j < n) {
    const int64_t m = n - j;
    const F x = load(s + j, m, -std::numeric_limits<float>::infinity()) - sh;
    const F e = exp_or_zero(x);
    acc += e;
    if (want_es) acc_es += e * maximum(x, lo);
    std::memcpy(s + j, &e, m * sizeof(float));
  }
  *sum_e = hsum(acc);
  *sum_es = want_es ? hsum(acc_es) : 0.0f;
}

inline float row_sum(const float* p, int64_t n) {
  F acc = splat(0.0f);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, p + j, W);
    acc += v;
  }
  float s = hsum(acc);
  for (; j < n; ++j) s += p[j];
  return s;
}

inline void scale_row(float* p, int64_t n, float c) {
  int64_t j = 0;
  const F cv = splat(c);
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, p + j, W);
    v *= cv;
    std::memcpy(p + j, &v, W);
  }
  for (; j < n; ++j) p[j] *= c;
}

inline void add_row(float* acc, const float* p, int64_t n) {
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F a, v;
    std::memcpy(&a, acc + j, W);
    std::memcpy(&v, p + j, W);
    a += v;
    std::memcpy(acc + j, &a, W);
  }
  for (; j < n; ++j) acc[j] += p[j];
}

// ds[j] = p[j] * (dp[j] - delta), in place over dp; 0 where p[j] is 0 (a masked key: the
// definition's masked_fill passes it no gradient, even when its value row makes dp NaN).
inline void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  int64_t j = 0;
  const F dv = splat(delta), zero = splat(0.0f);
  for (; j + L <= n; j += L) {
    F a, g;
    std::memcpy(&a, p + j, W);
    std::memcpy(&g, dp + j, W);
    g = as_float(as_int(a * (g - dv)) & ~(a == zero));
    std::memcpy(dp + j, &g, W);
  }
  for (; j < n; ++j) dp[j] = p[j] == 0.0f ? 0.0f : p[j] * (dp[j] - delta);
}

}  // namespace DSR_VEC_NS
