// See dsr_kernels/cpu_capability.h.
#include "dsr_kernels/cpu_capability.h"

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dsr_kernels {
namespace {

CpuIsa pick_isa() {
  std::string cap;
  if (const char* env = std::getenv("DSR_CPU_CAPABILITY")) cap = env;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx512 && avx2 && (cap.empty() || cap == "avx512")) return CpuIsa::Avx512;
  if (avx2 && (cap.empty() || cap == "avx512" || cap == "avx2")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Default;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = pick_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512:
      return "avx512";
    case CpuIsa::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t(2) << 20;
  if (!t.defined() || !t.is_cpu() || t.nbytes() < 2 * kHugePage) return;
  // Whole huge pages inside the tensor only: the advice never covers a neighbour's memory.
  const auto begin = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  const std::uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

}  // namespace dsr_kernels
