// CUDA kernels of norm_modulate.
//
// Forward and dX: one thread block per row (token); each thread walks the row in
// 16-byte vectors (8 bf16/fp16 or 4 fp32 values) when the row is aligned, reductions
// go through warp shuffles and one shared-memory step. The row is re-read for the
// second (variance) and third (output) passes: it is at most a few KiB, so these reads
// hit L1/L2 and the kernel moves each input byte from HBM once.
//
// Parameter gradients (shift, scale: per sample; weight, bias: per channel): a second
// kernel with one thread per channel, looping over a fixed chunk of kRowsPerChunk rows
// of one sample, writes per-chunk partial sums that the caller reduces in a fixed
// order. No atomics: the backward is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "dsr_kernels/cuda_utils.h"
#include "dsr_kernels/norm_modulate.h"

namespace dsr_kernels {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// max(a, b) that, as torch.amax, gives NaN when either is NaN (CUDA's max / fmaxf drop it).
template <typename acc_t>
__device__ __forceinline__ acc_t max_nan(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum (or max) over the block, returned to every thread. `smem` holds 32 values.
template <bool kMax, typename acc_t>
__device__ acc_t block_reduce(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? smem[lane] : acc_t(0);
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

template <typename scalar_t>
struct Pointers {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* regs;
  const acc_t* shift;
  const acc_t* scale;
  const acc_t* weight;
  const acc_t* bias;
  int64_t B, N, D, R, T;
  bool shared_registers;
  bool layernorm;
  acc_t eps;

  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t t) const {
    if (t < R) return regs + (shared_registers ? t : b * R + t) * D;
    return x + (b * N + (t - R)) * D;
  }
};

template <typename scalar_t>
Pointers<scalar_t> pointers(const NormModulateArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  Pointers<scalar_t> p;
  p.x = a.x.const_data_ptr<scalar_t>();
  p.regs = a.R ? a.registers.const_data_ptr<scalar_t>() : nullptr;
  p.shift = a.shift.defined() ? a.shift.const_data_ptr<acc_t>() : nullptr;
  p.scale = a.scale.defined() ? a.scale.const_data_ptr<acc_t>() : nullptr;
  p.weight = a.weight.defined() ? a.weight.const_data_ptr<acc_t>() : nullptr;
  p.bias = a.bias.defined() ? a.bias.const_data_ptr<acc_t>() : nullptr;
  p.B = a.B;
  p.N = a.N;
  p.D = a.D;
  p.R = a.R;
  p.T = a.tokens();
  p.shared_registers = a.shared_registers;
  p.layernorm = a.kind == NormKind::LayerNorm;
  p.eps = static_cast<acc_t>(a.eps);
  return p;
}

template <typename scalar_t, int VEC>
__global__ void norm_modulate_fwd_kernel(Pointers<scalar_t> p, scalar_t* __restrict__ out,
                                         scalar_t* __restrict__ residual, at::opmath_type<scalar_t>* norms,
                                         at::opmath_type<scalar_t>* moments, at::opmath_type<scalar_t>* mean_out,
                                         at::opmath_type<scalar_t>* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t smem[32];
  const int64_t row = blockIdx.x, b = row / p.T, t = row % p.T;
  const scalar_t* src = p.row(b, t);
  const int64_t nvec = p.D / VEC;

  acc_t sum = 0, sumsq = 0, absmax = 0, sum4 = 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P h = reinterpret_cast<const P*>(src)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(h.v[j]);
      sum += v;
      sumsq += v * v;
      absmax = max_nan(absmax, static_cast<acc_t>(fabs(v)));
      sum4 += v * v * v * v;
    }
  }
  sumsq = block_reduce<false>(sumsq, smem);
  acc_t mean = 0, var = sumsq / p.D;
  if (p.layernorm) {
    mean = block_reduce<false>(sum, smem) / p.D;
    acc_t sq = 0;  // second pass over the (cached) row: exact even when |mean| >> std
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const P h = reinterpret_cast<const P*>(src)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t d = static_cast<acc_t>(h.v[j]) - mean;
        sq += d * d;
      }
    }
    var = block_reduce<false>(sq, smem) / p.D;
  }
  const acc_t rstd = acc_t(1) / sqrt(var + p.eps);
  if (moments) {
    absmax = block_reduce<true>(absmax, smem);
    sum4 = block_reduce<false>(sum4, smem);
  }
  if (threadIdx.x == 0) {
    rstd_out[row] = rstd;
    if (mean_out) mean_out[row] = mean;
    if (norms) norms[row] = sqrt(sumsq);
    if (moments) {
      moments[2 * row] = absmax;
      moments[2 * row + 1] = sum4;
    }
  }

  const acc_t* shift = p.shift ? p.shift + b * p.D : nullptr;
  const acc_t* scale = p.scale ? p.scale + b * p.D : nullptr;
  P* dst = reinterpret_cast<P*>(out + row * p.D);
  P* res = residual ? reinterpret_cast<P*>(residual + row * p.D) : nullptr;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P h = reinterpret_cast<const P*>(src)[i];
    if (res) res[i] = h;
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t d = i * VEC + j;
      acc_t y = (static_cast<acc_t>(h.v[j]) - mean) * rstd;
      if (p.weight) y *= p.weight[d];
      if (p.bias) y += p.bias[d];
      if (scale) y *= acc_t(1) + scale[d];
      if (shift) y += shift[d];
      o.v[j] = static_cast<scalar_t>(y);
    }
    dst[i] = o;
  }
}

// dh = rstd * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) + dresidual, with
// gxhat = dout * (1 + scale) * weight. Register rows go to the float per-sample buffer.
template <typename scalar_t, int VEC>
__global__ void norm_modulate_bwd_dx_kernel(Pointers<scalar_t> p, const scalar_t* __restrict__ dout,
                                            const scalar_t* __restrict__ dres,
                                            const at::opmath_type<scalar_t>* __restrict__ mean_in,
                                            const at::opmath_type<scalar_t>* __restrict__ rstd_in,
                                            scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* __restrict__ dregs) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  __shared__ acc_t smem[32];
  const int64_t row = blockIdx.x, b = row / p.T, t = row % p.T;
  const scalar_t* src = p.row(b, t);
  const scalar_t* g = dout + row * p.D;
  const acc_t* scale = p.scale ? p.scale + b * p.D : nullptr;
  const acc_t mean = p.layernorm ? mean_in[row] : acc_t(0), rstd = rstd_in[row];
  const int64_t nvec = p.D / VEC;

  acc_t c1 = 0, c2 = 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P h = reinterpret_cast<const P*>(src)[i];
    const P gv = reinterpret_cast<const P*>(g)[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t d = i * VEC + j;
      const acc_t xhat = (static_cast<acc_t>(h.v[j]) - mean) * rstd;
      acc_t gx = static_cast<acc_t>(gv.v[j]);
      if (scale) gx *= acc_t(1) + scale[d];
      if (p.weight) gx *= p.weight[d];
      c1 += gx;
      c2 += gx * xhat;
    }
  }
  c1 = p.layernorm ? block_reduce<false>(c1, smem) / p.D : acc_t(0);
  c2 = block_reduce<false>(c2, smem) / p.D;

  const bool is_register = t < p.R;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const P h = reinterpret_cast<const P*>(src)[i];
    const P gv = reinterpret_cast<const P*>(g)[i];
    P dres_v;
    if (dres) dres_v = reinterpret_cast<const P*>(dres + row * p.D)[i];
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t d = i * VEC + j;
      const acc_t xhat = (static_cast<acc_t>(h.v[j]) - mean) * rstd;
      acc_t gx = static_cast<acc_t>(gv.v[j]);
      if (scale) gx *= acc_t(1) + scale[d];
      if (p.weight) gx *= p.weight[d];
      acc_t dh = rstd * (gx - c1 - xhat * c2);
      if (dres) dh += static_cast<acc_t>(dres_v.v[j]);
      if (is_register) {
        dregs[(b * p.R + t) * p.D + d] = dh;
      } else {
        o.v[j] = static_cast<scalar_t>(dh);
      }
    }
    if (!is_register) reinterpret_cast<P*>(dx + (b * p.N + t - p.R) * p.D)[i] = o;
  }
}

// One thread per channel d, kRowsPerChunk rows of one sample: partial sums of
// dshift = sum g, dscale = sum g * y, dweight = sum g (1 + scale) xhat, dbias = sum g (1 + scale).
template <typename scalar_t>
__global__ void norm_modulate_bwd_params_kernel(Pointers<scalar_t> p, const scalar_t* __restrict__ dout,
                                                const at::opmath_type<scalar_t>* __restrict__ mean_in,
                                                const at::opmath_type<scalar_t>* __restrict__ rstd_in,
                                                at::opmath_type<scalar_t>* p_shift, at::opmath_type<scalar_t>* p_scale,
                                                at::opmath_type<scalar_t>* p_weight, at::opmath_type<scalar_t>* p_bias,
                                                int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  // blockIdx.x: (sample, chunk) task, up to 2^31 - 1; blockIdx.y: channel tile (D <= 65535 * 128).
  const int64_t d = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t task = blockIdx.x, b = task / chunks, c = task % chunks;
  if (d >= p.D) return;
  const int64_t t0 = c * kRowsPerChunk, t1 = min(p.T, t0 + kRowsPerChunk);
  const acc_t one_plus_scale = p.scale ? acc_t(1) + p.scale[b * p.D + d] : acc_t(1);
  const acc_t w = p.weight ? p.weight[d] : acc_t(1), bias = p.bias ? p.bias[d] : acc_t(0);
  acc_t s_shift = 0, s_scale = 0, s_weight = 0, s_bias = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = b * p.T + t;
    const acc_t mean = p.layernorm ? mean_in[row] : acc_t(0);
    const acc_t xhat = (static_cast<acc_t>(p.row(b, t)[d]) - mean) * rstd_in[row];
    const acc_t g = static_cast<acc_t>(dout[row * p.D + d]);
    s_shift += g;
    s_scale += g * (xhat * w + bias);
    s_weight += g * one_plus_scale * xhat;
    s_bias += g * one_plus_scale;
  }
  const int64_t out = task * p.D + d;
  if (p_shift) p_shift[out] = s_shift;
  if (p_scale) p_scale[out] = s_scale;
  if (p_weight) p_weight[out] = s_weight;
  if (p_bias) p_bias[out] = s_bias;
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// The grids below: one block per row on x (at most 2^31 - 1 blocks), channel tiles on y
// (at most 65535). Checked before any launch, as the narrowing casts would wrap silently.
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

void check_rows(const NormModulateArgs& a) {
  const int64_t rows = a.B * a.tokens();
  TORCH_CHECK(rows <= kMaxGridX, "norm_modulate (CUDA): B * (R + N) = ", a.B, " * ", a.tokens(), " = ", rows,
              " rows, more than the ", kMaxGridX, " thread blocks a CUDA grid can have; split the batch");
}

int threads_for(int64_t nvec) {
  const int64_t warps = (nvec + 31) / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1), 16) * 32);
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
const T* cptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

void norm_modulate_fwd_cuda(const NormModulateArgs& a, NormModulateOutputs& o) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "norm_modulate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto p = pointers<scalar_t>(a);
    const bool vec = a.D % kVec == 0 && aligned16(p.x) && (!p.regs || aligned16(p.regs)) &&
                     aligned16(o.out.const_data_ptr()) && (!o.residual.defined() || aligned16(o.residual.const_data_ptr()));
    const int64_t rows = a.B * a.tokens();
    check_rows(a);
    const auto stream = current_cuda_stream();
    auto launch = [&](auto kernel, int64_t nvec) {
      kernel<<<static_cast<unsigned>(rows), threads_for(nvec), 0, stream>>>(
          p, o.out.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(o.residual), ptr_or_null<acc_t>(o.norms),
          ptr_or_null<acc_t>(o.moments), ptr_or_null<acc_t>(o.mean), o.rstd.mutable_data_ptr<acc_t>());
    };
    if (vec) {
      launch(norm_modulate_fwd_kernel<scalar_t, kVec>, a.D / kVec);
    } else {
      launch(norm_modulate_fwd_kernel<scalar_t, 1>, a.D);
    }
    DSR_CUDA_LAUNCH_CHECK();
  });
}

void norm_modulate_bwd_cuda(const NormModulateArgs& a, const at::Tensor& dout, const at::Tensor& dresidual,
                            const at::Tensor& mean, const at::Tensor& rstd, NormModulateGrads& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "norm_modulate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto p = pointers<scalar_t>(a);
    const int64_t T = a.tokens(), rows = a.B * T, chunks = chunks_per_sample(T);
    const bool vec = a.D % kVec == 0 && aligned16(p.x) && (!p.regs || aligned16(p.regs)) &&
                     aligned16(dout.const_data_ptr()) && aligned16(g.dx.const_data_ptr()) &&
                     (!dresidual.defined() || aligned16(dresidual.const_data_ptr()));
    check_rows(a);
    const bool want_params = g.dshift_partial.defined() || g.dscale_partial.defined() ||
                             g.dweight_partial.defined() || g.dbias_partial.defined();
    constexpr int kThreads = 128;  // the parameter kernel's block: channels [y * 128, y * 128 + 128)
    const int64_t tasks = a.B * chunks, tiles = (a.D + kThreads - 1) / kThreads;
    if (want_params) {
      TORCH_CHECK(tasks <= kMaxGridX, "norm_modulate backward (CUDA): B * ceil((R + N) / ", kRowsPerChunk,
                  ") = ", tasks, " row chunks, more than the ", kMaxGridX, " thread blocks a CUDA grid can have");
      TORCH_CHECK(tiles <= kMaxGridY, "norm_modulate backward (CUDA): D = ", a.D, " needs ", tiles,
                  " tiles of ", kThreads, " channels, more than the ", kMaxGridY, " a CUDA grid's y dimension allows");
    }
    const auto stream = current_cuda_stream();
    auto launch = [&](auto kernel, int64_t nvec) {
      kernel<<<static_cast<unsigned>(rows), threads_for(nvec), 0, stream>>>(
          p, dout.const_data_ptr<scalar_t>(), cptr_or_null<scalar_t>(dresidual), cptr_or_null<acc_t>(mean),
          rstd.const_data_ptr<acc_t>(), g.dx.mutable_data_ptr<scalar_t>(), ptr_or_null<acc_t>(g.dregisters));
    };
    if (vec) {
      launch(norm_modulate_bwd_dx_kernel<scalar_t, kVec>, a.D / kVec);
    } else {
      launch(norm_modulate_bwd_dx_kernel<scalar_t, 1>, a.D);
    }
    DSR_CUDA_LAUNCH_CHECK();
    if (want_params) {
      const dim3 grid(static_cast<unsigned>(tasks), static_cast<unsigned>(tiles));
      norm_modulate_bwd_params_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          p, dout.const_data_ptr<scalar_t>(), cptr_or_null<acc_t>(mean), rstd.const_data_ptr<acc_t>(),
          ptr_or_null<acc_t>(g.dshift_partial), ptr_or_null<acc_t>(g.dscale_partial),
          ptr_or_null<acc_t>(g.dweight_partial), ptr_or_null<acc_t>(g.dbias_partial), chunks);
      DSR_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace dsr_kernels
