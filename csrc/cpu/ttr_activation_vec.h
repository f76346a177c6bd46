// The vector GELU of csrc/cpu/ttr_activation.cpp, included there once per instruction set
// (each time under a `#pragma GCC target` region, with DSR_VEC_NS naming the namespace and
// DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2, 64 AVX-512). Not a standalone header.
//
// GELU(x) = 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <=
// 1.5e-7: the approximation ATen's vectorised GELU uses), exp by a Cephes-style
// polynomial; the tanh form as 0.5 x (1 + tanh(u)), tanh(u) = sign(u) (1 - e) / (1 + e)
// with e = exp(-2 |u|).
namespace DSR_VEC_NS {

constexpr int W = DSR_VEC_BYTES;
constexpr int64_t L = W / 4;  // float lanes
typedef float F __attribute__((vector_size(W)));
typedef int32_t I __attribute__((vector_size(W)));

inline F splat(float x) { return F{} + x; }
inline F as_float(I x) { return reinterpret_cast<const F&>(x); }
inline I as_int(F x) { return reinterpret_cast<const I&>(x); }
inline F abs_value(F x) { return as_float(as_int(x) & 0x7fffffff); }
inline F with_sign_of(F x, F sign) { return as_float(as_int(x) ^ (as_int(sign) & int32_t(0x80000000u))); }

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

// 1 / x. The vector division is the slowest instruction here (on AMD Zen 4 one AVX-512
// division issues every ~10 cycles), so AVX2 / AVX-512 take the hardware estimate and one
// Newton step: relative error ~1e-7, below the A&S erf's.
inline F reciprocal(F x) {
#if DSR_VEC_BYTES == 64
  const F r = _mm512_rcp14_ps(x);
  return r * (splat(2.0f) - x * r);
#elif DSR_VEC_BYTES == 32
  const F r = _mm256_rcp_ps(x);
  return r * (splat(2.0f) - x * r);
#else
  return splat(1.0f) / x;
#endif
}

// exp(x) for x <= 0 (clamped at -87, below float's smallest normal): x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n from the exponent bits.
inline F exp_nonpositive(F x) {
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
  return p * as_float((n + 127) << 23);
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
