// CUDA kernels of ttr_activation: GELU of the fc1 output with the test-time register
// neurons redirected (see ttr_activation.h; the CPU kernel, csrc/cpu/ttr_activation.cpp,
// is the same two-stage algorithm).
//
// Stage 1 (ttr_column_values_kernel): one thread block per (image b, selected neuron k)
// walks that one column of h (stride F) over the T tokens: max and min of the activation
// (block reductions: warp shuffles and one shared-memory step) give the register value.
// The patch rows' fill / threshold: "only_outliers" sums the patch activations in double
// (as the CPU kernel does) and makes a second pass for the centred sum of squares
// (unbiased std; one patch: NaN, which replaces nothing); "mean" finds the
// bottom_mean_count(P)-th smallest patch activation by a bitwise search over its
// order-preserving integer key (one block-wide count per bit, the keys cached in shared
// memory when the patches fit), then sums, in double, the activations below it plus
// the needed copies of it: the mean of the lowest m activations, exactly, without a
// sort, atomics or a host round trip. "layer_signed_max" adds a small kernel per image
// over the K columns' max / min.
//
// Stage 2 (ttr_activation_kernel): one pass over h, each block a tile of whole rows,
// each thread 16-byte vectors (8 bf16/fp16, 4 fp32, 2 fp64 values) when F and the
// pointers allow, else scalars. a = gelu(h) in float (double for double); in a patch or
// register row a vector looks up one 32-bit word of a bitmask of the selected columns
// and only where a bit is set reads the column's slot k and stage 1's [B, K] values.
// The bitmask and the slot map (int32 [F], -1 where not selected) are built by a tiny
// kernel per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dsr_kernels/cuda_utils.h"
#include "dsr_kernels/ttr_activation.h"

namespace dsr_kernels {
namespace {

// Shared memory for "mean"'s cached patch keys: dynamic, exactly P keys (P * 4 bytes for
// float, P * 8 for double), so a launch reserves what it uses and no more (blocks per SM
// are bounded by 228 KiB / the cache); up to 32 KiB (8192 float / 4096 double patches,
// under the 48 KiB a launch may take without opting in); more patches recompute the
// activations on each pass.
constexpr int kMeanCacheBytes = 32 * 1024;
constexpr int kMaxThreads = 256;

// The block's dynamic shared memory, as bytes (tools/cuda_emu defines its own: a buffer of
// exactly the launch's size, so that its sanitizers see a read past it).
#ifndef DSR_DYNAMIC_SHARED
#define DSR_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// Stage 2: vectors per block (whole rows; one row when a row has more).
constexpr int64_t kTileVectors = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ----------------------------------------------------------------------------- GELU

template <bool kTanh>
__device__ __forceinline__ float gelu(float x) {
  if (kTanh) return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

template <bool kTanh>
__device__ __forceinline__ double gelu(double x) {
  if (kTanh) return 0.5 * x * (1.0 + tanh(0.79788456080286536 * (x + 0.044715 * x * x * x)));
  return 0.5 * x * (1.0 + erf(x * 0.70710678118654752));
}

template <typename acc_t>
__device__ __forceinline__ acc_t gelu_rt(acc_t x, bool tanh_form) {
  return tanh_form ? gelu<true>(x) : gelu<false>(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t signed_max(acc_t hi, acc_t lo) {
  return hi >= -lo ? hi : lo;
}

// ----------------------------------------------------------------------------- block reductions

// max / min that propagate NaN, as torch.amax / amin (and the CPU kernel) do.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a != a ? a : (b > a || b != b ? b : a);
  }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a != a ? a : (b < a || b != b ? b : a);
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// op over the block (a multiple of 32 threads, every thread calls), returned to every thread.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T smem[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? smem[lane] : identity;
    v = warp_reduce(v, op);
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// ----------------------------------------------------------------------------- stage 1

// Order-preserving unsigned key of a float / double (a < b  <=>  key(a) < key(b), -0 < +0;
// every NaN the largest key, which decodes to NaN).
template <typename acc_t>
struct OrderedKey;

template <>
struct OrderedKey<float> {
  using U = uint32_t;
  static constexpr int kBits = 32;
  __device__ static __forceinline__ U encode(float v) {
    if (v != v) return ~U(0);  // NaN after every number, whatever its sign bit (torch.sort's order)
    U u;
    memcpy(&u, &v, sizeof(u));
    return (u >> 31) ? ~u : (u | 0x80000000u);
  }
  __device__ static __forceinline__ float decode(U k) {
    const U u = (k >> 31) ? (k & 0x7fffffffu) : ~k;
    float v;
    memcpy(&v, &u, sizeof(v));
    return v;
  }
};

template <>
struct OrderedKey<double> {
  using U = unsigned long long;
  static constexpr int kBits = 64;
  __device__ static __forceinline__ U encode(double v) {
    if (v != v) return ~U(0);  // NaN after every number (as the float key)
    U u;
    memcpy(&u, &v, sizeof(u));
    return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
  }
  __device__ static __forceinline__ double decode(U k) {
    const U u = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
    double v;
    memcpy(&v, &u, sizeof(v));
    return v;
  }
};

template <typename scalar_t>
struct ColumnParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  const int64_t* neurons;
  acc_t* reg;
  acc_t* fill;
  acc_t* thresh;
  acc_t* hi;  // [B, K] max / min, for layer_signed_max only (else null)
  acc_t* lo;
  int64_t T, F, K, p0, p1;
  int64_t mean_count;  // bottom_mean_count(P)
  bool tanh;
  bool max_only;  // register_value "max"
  bool same;      // patch_values "same" (kPatch 0 only): threshold +inf
};

// kPatch: 0 zero / same (or no patches), 1 only_outliers, 2 mean with the P patch keys in
// the launch's dynamic shared memory (P * sizeof(U) bytes), 3 mean recomputing the
// activations on each pass. 1-3 need P > 0.
template <typename scalar_t, int kPatch>
__global__ void ttr_column_values_kernel(ColumnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Key = OrderedKey<acc_t>;
  using U = typename Key::U;
  const int64_t task = blockIdx.x, b = task / p.K, k = task % p.K;
  const int64_t n = p.neurons[k];
  const int tid = threadIdx.x, nt = blockDim.x;
  const acc_t inf = static_cast<acc_t>(INFINITY);
  if (n < 0 || n >= p.F) {  // never after the API's checks; poison rather than read out of bounds
    if (tid == 0) {
      p.reg[task] = p.fill[task] = p.thresh[task] = static_cast<acc_t>(NAN);
      if (p.hi) p.hi[task] = p.lo[task] = static_cast<acc_t>(NAN);
    }
    return;
  }
  const scalar_t* col = p.h + b * p.T * p.F + n;
  const int64_t P = p.p1 - p.p0;
  auto act = [&](int64_t t) -> acc_t { return gelu_rt(static_cast<acc_t>(col[t * p.F]), p.tanh); };

  U* cache = nullptr;
  if constexpr (kPatch == 2) {
    DSR_DYNAMIC_SHARED(dsr_mean_keys);
    cache = reinterpret_cast<U*>(dsr_mean_keys);
  }

  acc_t hi = -inf, lo = inf;
  double sum = 0;
  for (int64_t t = tid; t < p.T; t += nt) {
    const acc_t a = act(t);
    hi = MaxOp()(hi, a);
    lo = MinOp()(lo, a);
    const bool patch = t >= p.p0 && t < p.p1;
    if constexpr (kPatch == 1) {
      if (patch) sum += static_cast<double>(a);
    }
    if constexpr (kPatch == 2) {
      if (patch) cache[t - p.p0] = Key::encode(a);
    }
  }
  hi = block_reduce(hi, MaxOp(), -inf);  // also publishes the cached keys
  lo = block_reduce(lo, MinOp(), inf);
  if (tid == 0) {
    p.reg[task] = p.max_only ? hi : signed_max(hi, lo);
    if (p.hi) {
      p.hi[task] = hi;
      p.lo[task] = lo;
    }
  }

  if constexpr (kPatch == 0) {
    if (tid == 0) {
      p.fill[task] = acc_t(0);
      p.thresh[task] = p.same ? inf : -inf;
    }
  } else if constexpr (kPatch == 1) {
    const double mean = block_reduce(sum, SumOp(), 0.0) / static_cast<double>(P);
    double ss = 0;  // second pass (the column is in L1 / L2): exact even when |mean| >> std
    for (int64_t t = p.p0 + tid; t < p.p1; t += nt) {
      const double d = static_cast<double>(act(t)) - mean;
      ss += d * d;
    }
    ss = block_reduce(ss, SumOp(), 0.0);
    if (tid == 0) {
      // Unbiased, as torch.std: NaN for a single patch, which then replaces nothing.
      const double sd = P > 1 ? sqrt(ss / static_cast<double>(P - 1)) : static_cast<double>(NAN);
      p.fill[task] = static_cast<acc_t>(mean);
      p.thresh[task] = static_cast<acc_t>(mean + sd);
    }
  } else {
    auto key_at = [&](int64_t i) -> U {
      if constexpr (kPatch == 2) {
        return cache[i];
      } else {
        return Key::encode(act(p.p0 + i));
      }
    };
    const long long m = p.mean_count;
    // The m-th smallest key x: the least x with #{key <= x} >= m, decided bit by bit from the top.
    U x = 0;
    for (int bit = Key::kBits - 1; bit >= 0; --bit) {
      const U trial = x | ((U(1) << bit) - U(1));
      long long c = 0;
      for (int64_t i = tid; i < P; i += nt) c += key_at(i) <= trial ? 1 : 0;
      c = block_reduce(c, SumOp(), 0ll);
      if (c < m) x |= U(1) << bit;
    }
    // The lowest m: everything below x, then copies of x.
    double s = 0;
    long long below = 0;
    for (int64_t i = tid; i < P; i += nt) {
      const U key = key_at(i);
      if (key < x) {
        s += static_cast<double>(Key::decode(key));
        ++below;
      }
    }
    s = block_reduce(s, SumOp(), 0.0);
    below = block_reduce(below, SumOp(), 0ll);
    if (tid == 0) {
      s += static_cast<double>(m - below) * static_cast<double>(Key::decode(x));
      p.fill[task] = static_cast<acc_t>(s / static_cast<double>(m));
      p.thresh[task] = -inf;
    }
  }
}

// layer_signed_max: per image, the signed max over the K columns' max / min.
template <typename acc_t>
__global__ void ttr_layer_signed_max_kernel(const acc_t* __restrict__ hi, const acc_t* __restrict__ lo,
                                            acc_t* __restrict__ reg, int64_t K) {
  const int64_t b = blockIdx.x;
  const acc_t inf = static_cast<acc_t>(INFINITY);
  acc_t mx = -inf, mn = inf;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    mx = MaxOp()(mx, hi[b * K + k]);
    mn = MinOp()(mn, lo[b * K + k]);
  }
  mx = block_reduce(mx, MaxOp(), -inf);
  mn = block_reduce(mn, MinOp(), inf);
  const acc_t v = signed_max(mx, mn);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) reg[b * K + k] = v;
}

// ----------------------------------------------------------------------------- stage 2

// slot[c] = k where neurons[k] == c, else -1; mask: bit c of the selected columns. One
// thread per 32-column word, writing only its own columns.
__global__ void ttr_slot_kernel(const int64_t* __restrict__ neurons, int64_t K, int64_t F, int64_t words,
                                int32_t* __restrict__ slot, uint32_t* __restrict__ mask) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= words) return;
  const int64_t c0 = w * 32, c1 = c0 + 32 < F ? c0 + 32 : F;
  for (int64_t c = c0; c < c1; ++c) slot[c] = -1;
  uint32_t bits = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = neurons[k];
    if (n >= c0 && n < c1) {
      bits |= 1u << (n - c0);
      slot[n] = static_cast<int32_t>(k);
    }
  }
  mask[w] = bits;
}

template <typename scalar_t>
struct FwdParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  scalar_t* out;
  const int32_t* slot;   // null when K == 0
  const uint32_t* mask;  // null when K == 0
  const acc_t* reg;
  const acc_t* fill;
  const acc_t* thresh;
  int64_t rows, T, F, K, p0, p1;
  int64_t nvec;            // vectors per row
  int64_t rows_per_block;  // nvec * rows_per_block <= kTileVectors when > 1
  int patch_kind;          // what a patch row does at a selected column: 0 keep, 1 fill, 2 fill above thresh
};

template <typename scalar_t, int VEC, bool kTanh>
__global__ void ttr_activation_kernel(FwdParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t nrows = p.rows - row0 < p.rows_per_block ? p.rows - row0 : p.rows_per_block;
  const int64_t b0 = row0 / p.T, t0 = row0 - b0 * p.T;
  const int64_t total = nrows * p.nvec;
  for (int64_t j = threadIdx.x; j < total; j += blockDim.x) {
    int64_t r = 0, v = j;
    if (p.rows_per_block > 1) {  // the tile has at most kTileVectors vectors: 32-bit division
      r = static_cast<uint32_t>(j) / static_cast<uint32_t>(p.nvec);
      v = j - r * p.nvec;
    }
    const int64_t c = v * VEC, off = (row0 + r) * p.F + c;
    const P in = *reinterpret_cast<const P*>(p.h + off);
    acc_t a[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = gelu<kTanh>(static_cast<acc_t>(in.v[i]));
    if (p.mask) {
      int64_t t = t0 + r, b = b0;
      if (t >= p.T) {
        const int64_t q = t / p.T;
        b += q;
        t -= q * p.T;
      }
      const int kind = t < p.p0 ? 0 : (t >= p.p1 ? 3 : p.patch_kind);
      if (kind != 0) {
        // VEC divides 32 and c is a multiple of VEC: the vector's bits lie in one word.
        const uint32_t bits = (p.mask[c >> 5] >> (c & 31)) & ((1u << VEC) - 1u);
        if (bits) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if ((bits >> i) & 1u) {
              const int64_t s = b * p.K + p.slot[c + i];
              if (kind == 3) {
                a[i] = p.reg[s];
              } else if (kind == 1 || a[i] > p.thresh[s]) {
                a[i] = p.fill[s];
              }
            }
          }
        }
      }
    }
    P o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(a[i]);
    *reinterpret_cast<P*>(p.out + off) = o;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

int threads_for(int64_t n) {
  const int64_t warps = (n + 31) / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1), kMaxThreads / 32) * 32);
}

}  // namespace

void ttr_column_values_cuda(const TtrActivationArgs& a, TtrColumnValues& values) {
  const int64_t tasks = a.B * a.K;
  if (tasks == 0) return;
  TORCH_CHECK(tasks <= std::numeric_limits<int32_t>::max(), "ttr_activation: B * K = ", tasks,
              " is too large for the CUDA kernel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h.scalar_type(), "ttr_column_values_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using U = typename OrderedKey<acc_t>::U;
    const int64_t P = a.patch_end() - a.prefix;
    ColumnParams<scalar_t> p;
    p.h = a.h.const_data_ptr<scalar_t>();
    p.neurons = a.neurons.const_data_ptr<int64_t>();
    p.reg = values.reg.mutable_data_ptr<acc_t>();
    p.fill = values.fill.mutable_data_ptr<acc_t>();
    p.thresh = values.thresh.mutable_data_ptr<acc_t>();
    p.hi = p.lo = nullptr;
    p.T = a.T;
    p.F = a.F;
    p.K = a.K;
    p.p0 = a.prefix;
    p.p1 = a.patch_end();
    p.mean_count = P > 0 ? bottom_mean_count(P) : 1;
    p.tanh = a.tanh;
    p.max_only = a.register_value == RegisterValue::Max;
    p.same = a.patch_values == PatchValues::Same;
    const bool layer = a.register_value == RegisterValue::LayerSignedMax;
    at::Tensor hilo;
    if (layer) {
      hilo = at::empty({2, a.B, a.K}, values.reg.options());
      p.hi = hilo.mutable_data_ptr<acc_t>();
      p.lo = p.hi + tasks;
    }
    const auto stream = current_cuda_stream();
    const unsigned grid = static_cast<unsigned>(tasks);
    const int threads = threads_for(a.T);
    if (a.patch_values == PatchValues::OnlyOutliers && P > 0) {
      ttr_column_values_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(p);
    } else if (a.patch_values == PatchValues::Mean && P > 0) {
      const int64_t bytes = P * static_cast<int64_t>(sizeof(U));
      if (bytes <= kMeanCacheBytes) {
        ttr_column_values_kernel<scalar_t, 2><<<grid, threads, static_cast<size_t>(bytes), stream>>>(p);
      } else {
        ttr_column_values_kernel<scalar_t, 3><<<grid, threads, 0, stream>>>(p);
      }
    } else {
      ttr_column_values_kernel<scalar_t, 0><<<grid, threads, 0, stream>>>(p);
    }
    DSR_CUDA_LAUNCH_CHECK();
    if (layer) {
      // B <= B * K = tasks, checked above, so the grid fits too.
      ttr_layer_signed_max_kernel<acc_t><<<static_cast<unsigned>(a.B), threads_for(a.K), 0, stream>>>(p.hi, p.lo, p.reg, a.K);
      DSR_CUDA_LAUNCH_CHECK();
    }
  });
}

void ttr_activation_fwd_cuda(const TtrActivationArgs& a, const TtrColumnValues& values, at::Tensor& out) {
  const int64_t rows = a.B * a.T;
  if (rows == 0 || a.F == 0) return;
  TORCH_CHECK(a.F <= std::numeric_limits<int32_t>::max(), "ttr_activation: F = ", a.F,
              " is too large for the CUDA kernel");
  const auto stream = current_cuda_stream();
  at::Tensor slot_mask;  // int32 [F] slots, then ceil(F / 32) mask words
  const int32_t* slot = nullptr;
  const uint32_t* mask = nullptr;
  if (a.K) {
    const int64_t words = (a.F + 31) / 32;
    slot_mask = at::empty({a.F + words}, a.h.options().dtype(at::kInt));
    int32_t* s = slot_mask.mutable_data_ptr<int32_t>();
    uint32_t* m = reinterpret_cast<uint32_t*>(s + a.F);
    constexpr int kSlotThreads = 128;
    ttr_slot_kernel<<<static_cast<unsigned>((words + kSlotThreads - 1) / kSlotThreads), kSlotThreads, 0, stream>>>(
        a.neurons.const_data_ptr<int64_t>(), a.K, a.F, words, s, m);
    DSR_CUDA_LAUNCH_CHECK();
    slot = s;
    mask = m;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h.scalar_type(), "ttr_activation_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    FwdParams<scalar_t> p;
    p.h = a.h.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.slot = slot;
    p.mask = mask;
    p.reg = a.K ? values.reg.const_data_ptr<acc_t>() : nullptr;
    p.fill = a.K ? values.fill.const_data_ptr<acc_t>() : nullptr;
    p.thresh = a.K ? values.thresh.const_data_ptr<acc_t>() : nullptr;
    p.rows = rows;
    p.T = a.T;
    p.F = a.F;
    p.K = a.K;
    p.p0 = a.prefix;
    p.p1 = a.patch_end();
    p.patch_kind = a.patch_values == PatchValues::Same ? 0 : (a.patch_values == PatchValues::OnlyOutliers ? 2 : 1);
    const bool vec = a.F % kVec == 0 && aligned16(p.h) && aligned16(p.out);
    const int vec_width = vec ? kVec : 1;
    p.nvec = a.F / vec_width;
    p.rows_per_block = std::min<int64_t>(std::max<int64_t>(kTileVectors / p.nvec, 1), rows);
    const int64_t blocks = (rows + p.rows_per_block - 1) / p.rows_per_block;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ttr_activation: B * T = ", rows,
                " rows are too many for the CUDA kernel");
    const unsigned grid = static_cast<unsigned>(blocks);
    const int threads = threads_for(p.rows_per_block * p.nvec);
    if (vec) {
      if (a.tanh) {
        ttr_activation_kernel<scalar_t, kVec, true><<<grid, threads, 0, stream>>>(p);
      } else {
        ttr_activation_kernel<scalar_t, kVec, false><<<grid, threads, 0, stream>>>(p);
      }
    } else {
      if (a.tanh) {
        ttr_activation_kernel<scalar_t, 1, true><<<grid, threads, 0, stream>>>(p);
      } else {
        ttr_activation_kernel<scalar_t, 1, false><<<grid, threads, 0, stream>>>(p);
      }
    }
    DSR_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace dsr_kernels
