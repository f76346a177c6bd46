// The vector row loops of csrc/cpu/norm_modulate.cpp (forward and backward), included
// there once per instruction set (each time under a `#pragma GCC target` region, with
// DSR_VEC_NS naming the namespace and DSR_VEC_BYTES the vector width: 16 SSE, 32 AVX2,
// 64 AVX-512). Not a standalone header.
//
// Every reduction runs over kLanes = 16 float lanes, element d of a row in lane d % 16
// whatever the vector width (four SSE vectors, two AVX2, one AVX-512), and ends in the
// same fixed tree; a row's tail runs through the same 16-lane code, padded with values
// that add nothing; nothing is contracted into FMAs (the including file turns
// fp-contract off). So every instruction set computes bit-identical results: the ISA
// changes the speed only.
namespace DSR_VEC_NS {

#include "vec_base.h"

constexpr int64_t V = kLanes / L;  // vectors per 16-lane block
typedef uint32_t U __attribute__((vector_size(W)));
typedef uint16_t H __attribute__((vector_size(W / 2)));  // L 16-bit values

template <typename To, typename From>
inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}

// max(a, b) that, as torch.amax, gives NaN when either is NaN.
inline F max_nan(F a, F b) { return ((a > b) | (a != a)) ? a : b; }

// ----------------------------------------------------------------------------- loads, stores
// L values at p as float, and back (float -> bfloat16 / half rounds to nearest even,
// exactly as c10::BFloat16(float) / c10::Half(float)).

inline F load(const float* p) {
  F v;
  std::memcpy(&v, p, W);
  return v;
}

inline F load(const c10::BFloat16* p) {
  H h;
  std::memcpy(&h, p, W / 2);
  return bits<F>(__builtin_convertvector(h, U) << 16);
}

inline F load(const c10::Half* p) {
#if defined(__x86_64__) && DSR_VEC_BYTES == 64
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__x86_64__) && DSR_VEC_BYTES == 32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  F v;
  for (int64_t j = 0; j < L; ++j) v[j] = static_cast<float>(p[j]);
  return v;
#endif
}

inline void store(float* p, F v) { std::memcpy(p, &v, W); }

inline void store(c10::BFloat16* p, F v) {
  const U u = bits<U>(v);
  U r = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  r = (v != v) ? U{} + 0x7fc0u : r;
  const H h = __builtin_convertvector(r, H);
  std::memcpy(p, &h, W / 2);
}

inline void store(c10::Half* p, F v) {
#if defined(__x86_64__) && DSR_VEC_BYTES == 64
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__x86_64__) && DSR_VEC_BYTES == 32
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int64_t j = 0; j < L; ++j) p[j] = static_cast<c10::Half>(v[j]);
#endif
}

// A row's last m < kLanes values as a full block: the values after them are `pad`.
template <typename scalar_t>
inline void load_tail(const scalar_t* p, int64_t m, float pad, F* x) {
  float tmp[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) tmp[j] = j < m ? static_cast<float>(p[j]) : pad;
  for (int64_t k = 0; k < V; ++k) x[k] = load(tmp + k * L);
}

// ----------------------------------------------------------------------------- reductions

inline float reduce_sum(const F* acc) {
  float a[kLanes];
  std::memcpy(a, acc, sizeof(a));
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}

inline float reduce_max_nan(const F* acc) {
  float a[kLanes];
  std::memcpy(a, acc, sizeof(a));
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) a[j] = (a[j] > a[j + w] || a[j] != a[j]) ? a[j] : a[j + w];
  return a[0];
}

// Pass 1 over a row of D values: sum, sum of squares and, with kMoments, max |h| and
// sum h^4. When h is not null the row is also written there as float.
template <bool kMoments, typename scalar_t>
RowSums row_sums(const scalar_t* src, float* h, int64_t D) {
  F s[V] = {}, q[V] = {}, mx[V] = {}, s4[V] = {};
  auto add = [&](const F* x) {
    for (int64_t k = 0; k < V; ++k) {
      const F x2 = x[k] * x[k];
      s[k] += x[k];
      q[k] += x2;
      if constexpr (kMoments) {
        mx[k] = max_nan(mx[k], abs_value(x[k]));
        s4[k] += x2 * x2;
      }
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    F x[V];
    for (int64_t k = 0; k < V; ++k) x[k] = load(src + i + k * L);
    if (h) {
      for (int64_t k = 0; k < V; ++k) store(h + i + k * L, x[k]);
    }
    add(x);
  }
  if (i < D) {
    F x[V];
    load_tail(src + i, D - i, 0.0f, x);
    if (h) {
      float tmp[kLanes];
      for (int64_t k = 0; k < V; ++k) store(tmp + k * L, x[k]);
      std::memcpy(h + i, tmp, (D - i) * sizeof(float));
    }
    add(x);
  }
  RowSums r;
  r.sum = reduce_sum(s);
  r.sumsq = reduce_sum(q);
  r.absmax = kMoments ? reduce_max_nan(mx) : 0.0f;
  r.sum4 = kMoments ? reduce_sum(s4) : 0.0f;
  return r;
}

// Pass 2 (LayerNorm): sum (h_d - mean)^2 over the float row h.
inline float centred_sumsq(const float* h, float mean, int64_t D) {
  F q[V] = {};
  const F m = splat(mean);
  auto add = [&](const F* x) {
    for (int64_t k = 0; k < V; ++k) {
      const F d = x[k] - m;
      q[k] += d * d;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    F x[V];
    for (int64_t k = 0; k < V; ++k) x[k] = load(h + i + k * L);
    add(x);
  }
  if (i < D) {
    F x[V];
    load_tail(h + i, D - i, mean, x);  // padded with the mean: adds 0
    add(x);
  }
  return reduce_sum(q);
}

// Pass 3: dst = (h - mean) * rstd * a + c, a and c the sample's output coefficients.
template <typename scalar_t>
void write_out(const float* h, float mean, float rstd, const float* a, const float* c, scalar_t* dst, int64_t D) {
  const F m = splat(mean), r = splat(rstd);
  int64_t i = 0;
  for (; i + L <= D; i += L) store(dst + i, (load(h + i) - m) * r * load(a + i) + load(c + i));
  if (i < D) {  // fewer than L values: the same arithmetic on a padded vector
    const int64_t n = D - i;
    float th[L] = {}, ta[L] = {}, tc[L] = {};
    std::memcpy(th, h + i, n * sizeof(float));
    std::memcpy(ta, a + i, n * sizeof(float));
    std::memcpy(tc, c + i, n * sizeof(float));
    scalar_t out[L];
    store(out, (load(th) - m) * r * load(ta) + load(tc));
    std::memcpy(dst + i, out, n * sizeof(scalar_t));
  }
}

template <bool kMoments, typename scalar_t>
void fwd_rows_impl(const FwdRows<scalar_t>& p, int64_t begin, int64_t end, float* buf) {
  const int64_t D = p.D;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / p.T, t = row % p.T;
    const scalar_t* src = p.row(b, t);
    if (p.residual) std::memcpy(p.residual + row * D, src, D * sizeof(scalar_t));
    const float* h;
    RowSums s;
    if constexpr (std::is_same_v<scalar_t, float>) {
      h = src;
      s = row_sums<kMoments>(src, nullptr, D);
    } else {
      h = buf;
      s = row_sums<kMoments>(src, buf, D);
    }
    float mean = 0.0f, var = s.sumsq / D;
    if (p.layernorm) {
      mean = s.sum / D;
      var = centred_sumsq(h, mean, D) / D;  // a second pass over the row, now in L1: exact even when |mean| >> std
    }
    const float rstd = 1.0f / std::sqrt(var + p.eps);
    p.rstd[row] = rstd;
    if (p.mean) p.mean[row] = mean;
    if (p.norms) p.norms[row] = std::sqrt(s.sumsq);
    if constexpr (kMoments) {
      p.moments[2 * row] = s.absmax;
      p.moments[2 * row + 1] = s.sum4;
    }
    write_out(h, mean, rstd, p.coef_a + b * D, p.coef_c + b * D, p.out + row * D, D);
  }
}

// Rows [begin, end) of the forward; buf: D floats of scratch (unused for float rows).
template <typename scalar_t>
void fwd_rows(const FwdRows<scalar_t>& p, int64_t begin, int64_t end, float* buf) {
  if (p.moments) {
    fwd_rows_impl<true>(p, begin, end, buf);
  } else {
    fwd_rows_impl<false>(p, begin, end, buf);
  }
}

// ----------------------------------------------------------------------------- backward

// Pass 1 of the backward on one 16-lane block of a row at channel offset i of the scratch
// rows: xhat = (x - mu) r, gy = dout (1 + scale), the partial sums of the parameter
// gradients, gxhat = gy w, and the lanes of c1 = sum gxhat and c2 = sum gxhat xhat.
struct BwdScratch {
  float *xhat, *gx, *s_shift, *s_scale, *s_w, *s_b, *ops, *w, *bias;
};

inline void bwd_block(const F* x, const F* g, F mu, F r, const BwdScratch& s, int64_t i, F* c1, F* c2) {
  for (int64_t k = 0; k < V; ++k) {
    const int64_t o = i + k * L;
    const F xh = (x[k] - mu) * r;
    const F gd = g[k];
    const F gy = gd * load(s.ops + o);
    const F w = load(s.w + o);
    store(s.s_shift + o, load(s.s_shift + o) + gd);
    store(s.s_scale + o, load(s.s_scale + o) + gd * (xh * w + load(s.bias + o)));
    store(s.s_w + o, load(s.s_w + o) + gy * xh);
    store(s.s_b + o, load(s.s_b + o) + gy);
    const F gxh = gy * w;
    store(s.xhat + o, xh);
    store(s.gx + o, gxh);
    c1[k] += gxh;
    c2[k] += gxh * xh;
  }
}

// dh = r (gxhat - c1 - xhat c2) (+ dresidual) for L channels at i.
template <typename scalar_t>
inline F bwd_dh(const BwdScratch& s, int64_t i, F r, F c1, F c2, const scalar_t* dr) {
  F dh = r * (load(s.gx + i) - c1 - load(s.xhat + i) * c2);
  if (dr) dh += load(dr + i);
  return dh;
}

// Tasks [begin, end) of the backward (see BwdRows); scratch: kBwdScratchRows * D floats.
template <typename scalar_t>
void bwd_tasks(const BwdRows<scalar_t>& p, int64_t begin, int64_t end, float* scratch) {
  const int64_t D = p.D;
  BwdScratch s;
  float** rows[] = {&s.xhat, &s.gx, &s.s_shift, &s.s_scale, &s.s_w, &s.s_b, &s.ops, &s.w, &s.bias};
  for (int64_t k = 0; k < kBwdScratchRows; ++k) *rows[k] = scratch + k * D;
  for (int64_t d = 0; d < D; ++d) {
    s.w[d] = p.weight ? p.weight[d] : 1.0f;
    s.bias[d] = p.bias ? p.bias[d] : 0.0f;
  }
  // A row's tail (fewer than 16 channels) runs through the same block code on copies of its
  // scratch values padded to 16 lanes: x = mu and dout = 0 there, which add nothing.
  const int64_t full = D / kLanes * kLanes, m = D - full;
  float tail[kBwdScratchRows][kLanes];
  BwdScratch ts;
  float** trows[] = {&ts.xhat, &ts.gx, &ts.s_shift, &ts.s_scale, &ts.s_w, &ts.s_b, &ts.ops, &ts.w, &ts.bias};
  for (int64_t k = 0; k < kBwdScratchRows; ++k) *trows[k] = tail[k];
  for (int64_t task = begin; task < end; ++task) {
    int64_t b, t0, t1;
    p.task_rows(task, b, t0, t1);
    std::fill(s.s_shift, s.s_shift + 4 * D, 0.0f);
    for (int64_t d = 0; d < D; ++d) s.ops[d] = p.scale ? 1.0f + p.scale[b * D + d] : 1.0f;
    if (m) {
      for (int64_t k = 0; k < kBwdScratchRows; ++k) {
        std::fill(tail[k], tail[k] + kLanes, k == 6 || k == 7 ? 1.0f : 0.0f);  // ops and w padded with 1
        std::memcpy(tail[k], *rows[k] + full, m * sizeof(float));
      }
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = b * p.T + t;
      const scalar_t* src = p.row(b, t);
      const scalar_t* g_row = p.dout + row * D;
      const float mean = p.mean ? p.mean[row] : 0.0f;
      const F mu = splat(mean), r = splat(p.rstd[row]);
      F c1v[V] = {}, c2v[V] = {};
      for (int64_t i = 0; i < full; i += kLanes) {
        F x[V], g[V];
        for (int64_t k = 0; k < V; ++k) {
          x[k] = load(src + i + k * L);
          g[k] = load(g_row + i + k * L);
        }
        bwd_block(x, g, mu, r, s, i, c1v, c2v);
      }
      if (m) {
        F x[V], g[V];
        load_tail(src + full, m, mean, x);
        load_tail(g_row + full, m, 0.0f, g);
        bwd_block(x, g, mu, r, ts, 0, c1v, c2v);
      }
      const F c1 = splat(p.mean ? reduce_sum(c1v) / D : 0.0f), c2 = splat(reduce_sum(c2v) / D);
      // Pass 2: dh = rstd (gxhat - c1 - xhat c2) + dresidual.
      const scalar_t* dr = p.dres ? p.dres + row * D : nullptr;
      float* dreg = t < p.R ? p.dregs + (b * p.R + t) * D : nullptr;
      scalar_t* dx = t < p.R ? nullptr : p.dx + (b * p.N + t - p.R) * D;
      for (int64_t i = 0; i < full; i += L) {
        const F dh = bwd_dh(s, i, r, c1, c2, dr);
        if (dreg) {
          store(dreg + i, dh);
        } else {
          store(dx + i, dh);
        }
      }
      scalar_t dr_tail[kLanes] = {};
      if (m && dr) std::memcpy(dr_tail, dr + full, m * sizeof(scalar_t));
      for (int64_t i = 0; i < m; i += L) {  // the tail, from the padded copies
        const F dh = bwd_dh(ts, i, r, c1, c2, dr ? dr_tail : nullptr);
        const int64_t n = std::min<int64_t>(L, m - i);
        if (dreg) {
          float tmp[L];
          store(tmp, dh);
          std::memcpy(dreg + full + i, tmp, n * sizeof(float));
        } else {
          scalar_t tmp[L];
          store(tmp, dh);
          std::memcpy(dx + full + i, tmp, n * sizeof(scalar_t));
        }
      }
    }
    if (m) {  // the tail's partial sums back into the scratch rows
      for (int64_t k = 2; k < 6; ++k) std::memcpy(*rows[k] + full, tail[k], m * sizeof(float));
    }
    float* partials[4] = {p.p_shift, p.p_scale, p.p_w, p.p_b};
    for (int k = 0; k < 4; ++k)
      if (partials[k]) std::memcpy(partials[k] + task * D, s.s_shift + k * D, D * sizeof(float));
  }
}

}  // namespace DSR_VEC_NS
