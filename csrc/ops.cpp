// The compiled extension's module-level parts: the one TORCH_LIBRARY block of the
// dsr_kernels namespace and the Python module that loads the ops.
//
// Each op registers itself next to its kernels with TORCH_LIBRARY_FRAGMENT (schemas) and
// TORCH_LIBRARY_IMPL (CPU, CUDA, Meta): csrc/norm_modulate.cpp, csrc/ttr_activation.cpp,
// csrc/cpu/attention.cpp. Autograd is registered from Python (dsr_kernels/ops/<op>.py).
#include <torch/library.h>

#include <string>

#include "dsr_kernels/cpu_capability.h"

// The namespace's one non-fragment definition: it claims dsr_kernels, so that another
// library defining the same namespace fails at load time instead of mixing its ops in.
TORCH_LIBRARY(dsr_kernels, m) {}

#ifndef DSR_NO_PYTHON
#include <torch/extension.h>

// setup.py writes build_info.h (into build/generated/, not the source tree) with the
// reason it left the CUDA kernels out; other builds say only whether they are in.
#if __has_include("dsr_kernels/build_info.h")
#include "dsr_kernels/build_info.h"
#endif
#ifndef DSR_CUDA_SKIP_REASON
#ifdef DSR_WITH_CUDA
#define DSR_CUDA_SKIP_REASON ""
#else
#define DSR_CUDA_SKIP_REASON "built without DSR_WITH_CUDA"
#endif
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsr_kernels compiled kernels; the ops are registered under torch.ops.dsr_kernels";
  m.def("cuda_built", [] {
#ifdef DSR_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_skip_reason", [] { return std::string(DSR_CUDA_SKIP_REASON); },
        "why the CUDA kernels were not built (empty when they were), as setup.py decided it");
  m.def("cpu_capability", [] { return std::string(dsr_kernels::cpu_isa_name(dsr_kernels::cpu_isa())); },
        "the instruction set the CPU kernels picked at run time (avx512, avx2 or default)");
}
#endif
