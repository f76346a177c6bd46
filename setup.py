"""Builds the compiled extension ``dsr_kernels._C`` (csrc/) with ninja.

- The CPU kernels are always built, against the torch already installed (install with
  ``pip install --no-build-isolation`` so that the build sees that torch).
- The CUDA kernels join when torch has CUDA and nvcc is found, or when FORCE_CUDA=1;
  architectures from TORCH_CUDA_ARCH_LIST (default "8.0;9.0": sm_80 and sm_90).
- DSR_SKIP_BUILD=1 installs the pure-Python package: every op still runs through its
  Triton / PyTorch backends, and the compiled backends say why they are unavailable.
"""

import os
from glob import glob

from setuptools import setup


def _extensions():
    if os.environ.get("DSR_SKIP_BUILD", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    sources = ["csrc/ops.cpp", *sorted(glob("csrc/cpu/*.cpp"))]
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or 20).
    cxx = ["-O3", "-fopenmp"]  # at::parallel_for (and `omp simd`) are OpenMP in the translation unit
    kwargs = dict(include_dirs=[os.path.abspath("csrc/include")], extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob("csrc/cuda/*.cu")) + sorted(glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "dsr_kernels._C",
            sources,
            define_macros=[("DSR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension("dsr_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
