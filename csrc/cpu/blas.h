// The BLAS shim of the CPU attention kernels: row-major single-precision GEMM through the
// Fortran BLAS that libtorch links (MKL on x86 wheels, OpenBLAS or Accelerate elsewhere),
// one thread per call inside our parallel regions. Used by csrc/cpu/attention.cpp only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

// The Fortran BLAS sgemm of the BLAS libtorch links (MKL on x86 wheels, OpenBLAS or
// Accelerate elsewhere), which libtorch_cpu exports; ATen's own cpublas::gemm is not
// exported to extensions. Weak: where it is missing, gemm_rm falls back to at::addmm_out.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (libtorch_cpu exports it where torch links MKL): inside our
// parallel region each GEMM must run on its own thread; MKL does not see libgomp's region
// and would start threads of its own on every call (measured: 5x slower on 2 cores).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // (mkl_set_num_threads_local: by pointer)

namespace dsr_kernels {
namespace blas {

// Within its scope, BLAS calls of this thread run on this thread only.
class SerialBlas {
 public:
  SerialBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int previous_;
};

inline at::Tensor view_rm(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  at::Tensor t = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
  return trans ? t.t() : t;
}

// Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C, through the column-major BLAS
// (C^T = op(B)^T op(A)^T: a row-major matrix read column-major is its transpose).
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta C (an empty product; BLAS would reject the zero leading dimension of A)
    for (int64_t i = 0; i < M; ++i) {
      float* row = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  // BLAS takes a leading dimension of at least the row length (it prints an error and
  // returns without writing C otherwise). A matrix of one row is read once, whatever its
  // stride; for more rows a smaller stride (expanded or overlapping rows) is a caller's
  // bug, raised here rather than handed on. (The launchers copy such operands.)
  auto leading = [](const char* what, int64_t ld, int64_t rows, int64_t cols) {
    if (rows <= 1) return std::max<int64_t>(ld, std::max<int64_t>(cols, 1));
    TORCH_CHECK(ld >= cols, "attention (cpu): ", what, " rows have stride ", ld, " below their length ", cols,
                " (expanded or overlapping rows must be copied before the kernel)");
    return ld;
  };
  lda = trans_a ? leading("an operand's", lda, K, M) : leading("an operand's", lda, M, K);
  ldb = trans_b ? leading("an operand's", ldb, N, K) : leading("an operand's", ldb, K, N);
  ldc = leading("an output's", ldc, M, N);
  if (sgemm_ != nullptr) {
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
                "attention (cpu): a block of ", M, " x ", N, " x ", K, " exceeds the 32-bit BLAS interface");
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  at::Tensor c = view_rm(C, M, N, ldc, false);
  at::Tensor a = trans_a ? view_rm(A, K, M, lda, true) : view_rm(A, M, K, lda, false);
  at::Tensor b = trans_b ? view_rm(B, N, K, ldb, true) : view_rm(B, K, N, ldb, false);
  if (beta == 0.0f) c.zero_();  // addmm's beta = 0 still reads C (NaN * 0)
  at::addmm_out(c, c, a, b, beta, alpha);
}

}  // namespace blas
}  // namespace dsr_kernels
