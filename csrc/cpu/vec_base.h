// The vector basics every CPU kernel's row code shares: the float / int32 vector types of
// one instruction set, splat, bit casts, |x|, max and exp for x <= 0. Included *inside*
// the namespace of each per-ISA copy of a kernel's *_vec.h (which the kernel's .cpp
// includes once per instruction set under a `#pragma GCC target` region, with
// DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2, 64 AVX-512). No include guard on
// purpose: each inclusion is a different namespace and target. Not a standalone header:
// the including .cpp has included <cstring>, <cstdint> and, on x86, <immintrin.h>.

constexpr int W = DSR_VEC_BYTES;
constexpr int64_t L = W / 4;  // float lanes
typedef float F __attribute__((vector_size(W)));
typedef int32_t I __attribute__((vector_size(W)));

inline F splat(float x) { return F{} + x; }
inline F as_float(I x) { return (F)x; }  // a cast between vector types of one size keeps the bits
inline I as_int(F x) { return (I)x; }
inline F abs_value(F x) { return as_float(as_int(x) & 0x7fffffff); }

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

// exp(x) for x <= 0, clamped at -87 (below float's smallest normal, so exp(-inf) gives
// ~1.6e-38, not 0: exp_or_zero is the masked form): x = n ln2 + r, |r| <= ln2 / 2, exp(r)
// by Cephes' degree-6 polynomial (relative error ~1e-7), 2^n from the exponent bits.
// A NaN x gives NaN: its lanes are computed on 0 (no NaN reaches the float-to-int
// conversion) and put back at the end.
inline F exp_nonpositive(F x_in) {
  const I nan = x_in != x_in;
  const F x = maximum(as_float(as_int(x_in) & ~nan), splat(-87.0f));
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
  return as_float((as_int(p * as_float((n + 127) << 23)) & ~nan) | (as_int(x_in) & nan));
}

// exp(x) for x <= 0, exactly 0 for x <= -87 (and for -inf: masked keys), NaN for NaN (a
// NaN logit is never mistaken for a masked key).
inline F exp_or_zero(F x) { return as_float(as_int(exp_nonpositive(x)) & ~(x <= splat(-87.0f))); }

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
