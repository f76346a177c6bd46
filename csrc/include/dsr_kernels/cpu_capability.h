// The instruction set the CPU kernels run with, picked once per process from what the
// processor supports; DSR_CPU_CAPABILITY=default|avx2|avx512 caps it (as
// ATEN_CPU_CAPABILITY does for ATen), e.g. to test each vector path on one machine.
//
// Kernels with per-ISA code compile it several times (baseline x86-64 / SSE2, AVX2 + FMA
// + F16C, AVX-512 F/BW/DQ/VL) under `#pragma GCC target` regions and switch on cpu_isa().
#pragma once

#include <ATen/core/Tensor.h>

namespace dsr_kernels {

enum class CpuIsa : int { Default = 0, Avx2 = 1, Avx512 = 2 };

CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// Asks the kernel to back a large, freshly allocated CPU tensor with transparent huge
// pages (madvise(MADV_HUGEPAGE); Linux only, a no-op elsewhere, for small tensors, or
// where the system disables THP). Writing a new output of tens of MB otherwise takes one
// page fault per 4 KiB page, which on some machines costs more than the kernel that
// fills it. A hint only: contents and ownership of the memory do not change.
void advise_huge_pages(const at::Tensor& t);

}  // namespace dsr_kernels
