// The row operations of csrc/cpu/attention.cpp, included there once per instruction set
// (each time under a `#pragma GCC target` region, with DSR_VEC_NS naming the namespace and
// DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2, 64 AVX-512). Not a standalone header.
//
// exp by a Cephes-style polynomial for arguments <= 0 (every exponent here is a logit
// minus the row's max or its log-sum-exp), exactly 0 below -87 (masked keys: -inf).
namespace DSR_VEC_NS {

constexpr int W = DSR_VEC_BYTES;
constexpr int64_t L = W / 4;  // float lanes
typedef float F __attribute__((vector_size(W)));
typedef int32_t I __attribute__((vector_size(W)));

inline F splat(float x) { return F{} + x; }
inline F as_float(I x) { return (F)x; }  // a cast between vector types of one size keeps the bits
inline I as_int(F x) { return (I)x; }

inline F maximum(F a, F b) {
#if defined(__x86_64__) && DSR_VEC_BYTES == 64
  return _mm512_max_ps(a, b);
#elif defined(__x86_64__) && DSR_VEC_BYTES == 32
  return _mm256_max_ps(a, b);
#elif defined(__x86_64__)
  return _mm_max_ps(a, b);
#else
  return a < b ? b : a;
#endif
}

inline F load(const float* p, int64_t n, float fill) {  // n < L lanes, the rest = fill
  F v = splat(fill);
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// exp(x) for x <= 0; 0 for x < -87 (and for -inf).
inline F exp_or_zero(F x) {
  const I keep = x > splat(-87.0f);
  x = maximum(x, splat(-87.0f));
  const I n = __builtin_convertvector(x * splat(1.44269504088896341f) - splat(0.5f), I);
  const F nf = __builtin_convertvector(n, F);
  const F r = x - nf * splat(0.693359375f) + nf * splat(2.12194440e-4f);
  F p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  return as_float(as_int(p * as_float((n + 127) << 23)) & keep);
}

inline float hsum(F v) {
  float s = 0.0f;
  for (int64_t l = 0; l < L; ++l) s += v[l];
  return s;
}

inline float hmax(F v) {
  float m = v[0];
  for (int64_t l = 1; l < L; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

inline float row_max(const float* s, int64_t n) {
  F m = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, s + j, W);
    m = maximum(m, v);
  }
  if (j < n) m = maximum(m, load(s + j, n - j, -std::numeric_limits<float>::infinity()));
  return hmax(m);
}

// s[j] <- exp(s[j] - shift) in place; returns sum_j e_j and (want_es) sum_j e_j s_j (masked
// keys, s = -inf, give e = 0 and add nothing: s is clamped to -FLT_MAX for the product).
inline void exp_row(float* s, int64_t n, float shift, bool want_es, float* sum_e, float* sum_es) {
  F acc = splat(0.0f), acc_es = splat(0.0f);
  const F sh = splat(shift), lo = splat(-std::numeric_limits<float>::max());
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    F v;
    std::memcpy(&v, s + j, W);
    const F e = exp_or_zero(v - sh);
    acc += e;
    if (want_es) acc_es += e * maximum(v, lo);
    std::memcpy(s + j, &e, W);
  }
  if (j < n) {
    const int64_t m = n - j;
    const F v = load(s + j, m, -std::numeric_limits<float>::infinity());
    const F e = exp_or_zero(v - sh);
    acc += e;
    if (want_es) acc_es += e * maximum(v, lo);
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

// ds[j] = p[j] * (dp[j] - delta), in place over dp.
inline void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  int64_t j = 0;
  const F dv = splat(delta);
  for (; j + L <= n; j += L) {
    F a, g;
    std::memcpy(&a, p + j, W);
    std::memcpy(&g, dp + j, W);
    g = a * (g - dv);
    std::memcpy(dp + j, &g, W);
  }
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

}  // namespace DSR_VEC_NS
