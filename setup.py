"""Builds the compiled extension ``dsr_kernels._C`` (csrc/) with ninja.

- The CPU kernels are always built, against the torch already installed (install with
  ``pip install --no-build-isolation`` so that the build sees that torch).
- The CUDA kernels join when the CUDA toolkit is usable (``cuda_toolkit_problem``: torch
  has CUDA, CUDA_HOME resolves, its nvcc runs, its include/cuda_runtime_api.h exists);
  otherwise the build makes the CPU kernels only, prints one warning saying why, and
  ``dsr-kernels info`` reports that reason (compiled in: ``_C.cuda_skip_reason()``).
  ``DSR_BUILD_CUDA=1`` insists (the build fails with the reason), ``DSR_BUILD_CUDA=0``
  leaves them out. Architectures from TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
- DSR_SKIP_BUILD=1 installs the pure-Python package: every op still runs through its
  Triton / PyTorch backends, and the compiled backends say why they are unavailable.

tools/check_cuda_compile.sh compiles the CUDA sources with ``nvcc_flags()``: the flags
this build gives nvcc.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from glob import glob
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20).
CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for (and `omp simd`) are OpenMP in the translation unit
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
CUDA_ARCHS = "8.0;9.0"  # TORCH_CUDA_ARCH_LIST when unset
GENERATED = ROOT / "build" / "generated"  # dsr_kernels/build_info.h


def find_cuda_home(env: Mapping[str, str], which: Callable[[str], str | None] = shutil.which) -> tuple[str | None, str]:
    """CUDA_HOME as torch.utils.cpp_extension resolves it, and where that came from."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var], f"from ${var}"
    nvcc = which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(nvcc)), f"guessed from the nvcc on PATH, {nvcc}"
    if os.path.exists("/usr/local/cuda"):
        return "/usr/local/cuda", "the default"
    return None, "CUDA_HOME unset, no nvcc on PATH, no /usr/local/cuda"


def _nvcc_error(nvcc: str) -> str | None:
    try:
        run = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if run.returncode == 0 else f"exit status {run.returncode}: {(run.stderr or run.stdout).strip()[-200:]}"


def cuda_toolkit_problem(
    torch_cuda: str | None,
    cuda_home: str | None,
    origin: str,
    nvcc_error: Callable[[str], str | None] = _nvcc_error,
) -> str | None:
    """None when the CUDA kernels can be built, else what is missing (naming CUDA_HOME)."""
    home = f"CUDA_HOME={cuda_home} ({origin})" if cuda_home else f"no CUDA toolkit ({origin})"
    if torch_cuda is None:
        return f"the installed torch has no CUDA (torch.version.cuda is None); {home}"
    if cuda_home is None:
        return home
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    error = nvcc_error(nvcc)
    if error:
        return f"{home}: {nvcc} does not run ({error}); set CUDA_HOME to the toolkit's root"
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return f"{home} has no include/cuda_runtime_api.h; set CUDA_HOME to the toolkit's root"
    return None


def decide_cuda(env: Mapping[str, str], problem: Callable[[], str | None]) -> tuple[bool, str]:
    """(build the CUDA kernels?, why not: "" when they are built). Raises for DSR_BUILD_CUDA=1 that cannot."""
    force = env.get("DSR_BUILD_CUDA", "")
    if force not in ("", "0", "1"):
        raise SystemExit(
            f"DSR_BUILD_CUDA must be 0 or 1 (or unset: build them when the toolkit is usable), got {force!r}"
        )
    if force == "0":
        return False, "left out with DSR_BUILD_CUDA=0"
    why = problem()
    if why is None:
        return True, ""
    if force == "1":
        raise SystemExit(f"DSR_BUILD_CUDA=1, but the CUDA kernels cannot be built: {why}")
    return False, why


def _c_string(text: str) -> str:
    """A C string literal of text (UTF-8; anything but printable ASCII as octal escapes)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03o}" for b in text.encode()) + '"'


def write_build_info(skip_reason: str) -> None:
    """build/generated/dsr_kernels/build_info.h, rewritten only when it changes (ninja then rebuilds ops.cpp)."""
    header = GENERATED / "dsr_kernels" / "build_info.h"
    text = f"// Written by setup.py.\n#pragma once\n#define DSR_CUDA_SKIP_REASON {_c_string(skip_reason)}\n"
    if not header.exists() or header.read_text() != text:
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(text)


def nvcc_flags() -> list[str]:
    """nvcc's flags for csrc/cuda/*.cu in this build, as torch.utils.cpp_extension composes them (minus includes)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, _get_cuda_arch_flags

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list or CUDA_ARCHS  # read by _get_cuda_arch_flags, as in the build
    try:
        arch = _get_cuda_arch_flags(NVCC_FLAGS)
    finally:
        if arch_list is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
    defines = ["-DDSR_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    return [*COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", *NVCC_FLAGS, *defines, *arch, "-std=c++20"]


def _extensions():
    if os.environ.get("DSR_SKIP_BUILD", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cuda_home, origin = find_cuda_home(os.environ)
    with_cuda, skip_reason = decide_cuda(
        os.environ, lambda: cuda_toolkit_problem(torch.version.cuda, cuda_home, origin)
    )
    if skip_reason:
        print(f"WARNING: dsr_kernels: building the CPU kernels only: {skip_reason}", file=sys.stderr)
    write_build_info(skip_reason)
    sources = [*sorted(glob("csrc/*.cpp")), *sorted(glob("csrc/cpu/*.cpp"))]  # ops.cpp, each op's registration, kernels
    kwargs = dict(include_dirs=[str(ROOT / "csrc" / "include"), str(GENERATED)], extra_link_args=["-fopenmp"])
    if not with_cuda:
        return [CppExtension("dsr_kernels._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)], {
            "build_ext": BuildExtension.with_options(use_ninja=True)
        }
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    sources += sorted(glob("csrc/cuda/*.cu")) + sorted(glob("csrc/cuda/*.cpp"))
    ext = CUDAExtension(
        "dsr_kernels._C",
        sources,
        define_macros=[("DSR_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        **kwargs,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
