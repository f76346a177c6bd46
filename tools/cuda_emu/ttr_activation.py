"""Runs csrc/cuda/ttr_activation.cu's kernels, their own source, on the CPU, against the CPU kernel.

No GPU is needed: the CUDA emulator of ``../shared/tools/cuda-emu`` (``shim.h``: each
block's threads as std::threads, __syncthreads a barrier, warp shuffles) runs the
unchanged kernels. This script copies the .cu file and the headers it includes into a
scratch folder, renames the namespace (so the emulated functions do not meet the real
extension's), rewrites each ``kernel<<<grid, block, smem, stream>>>(args)`` as a launch of
the emulator that gives the block exactly ``smem`` bytes of dynamic shared memory (a heap
buffer: AddressSanitizer sees any read past it), builds it with a small binding under
``-fsanitize=address,undefined``, and compares every output with the CPU kernel
(``torch.ops.dsr_kernels.ttr_activation_fwd``) over dtypes, patch and register variants,
shapes around the 32 KiB "mean" cache (cached and recomputed), neurons and prefixes.

    python tools/cuda_emu/ttr_activation.py [--shim ../shared/tools/cuda-emu/shim.h]

It takes a few minutes (the build, then a thread per emulated GPU thread); CI does not
run it. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = r"""
#include <cstddef>
#include <memory>
#include "shim.h"
#define __align__(n) alignas(n)
#define __restrict__ __restrict
namespace emu_dyn {
inline std::unique_ptr<unsigned char[]> buffer;  // the running launch's dynamic shared memory
}
#define DSR_DYNAMIC_SHARED(name) unsigned char* name = emu_dyn::buffer.get()
template <typename K, typename G>
auto emu_launch(K kernel, G grid, int threads, std::size_t smem, cudaStream_t stream) {
  auto run = emu::launch(kernel, grid, static_cast<unsigned>(threads), 0, stream);
  return [=](auto&&... args) {
    emu_dyn::buffer.reset(smem ? new unsigned char[smem] : nullptr);  // exactly the launch's bytes
    run(args...);
    emu_dyn::buffer.reset();
  };
}
"""

CUDA_UTILS = r"""
#pragma once
#include <c10/util/Exception.h>
// (shim.h defines dsr_emul::current_cuda_stream and DSR_CUDA_LAUNCH_CHECK)
"""

BINDING = r"""
#include <torch/extension.h>
#include "dsr_kernels/ttr_activation.h"

using namespace dsr_emul;

at::Tensor emu_ttr(const at::Tensor& h, const at::Tensor& neurons, int64_t registers, int64_t prefix,
                   int64_t patch_values, int64_t register_value, bool tanh) {
  TtrActivationArgs a;
  a.h = h.contiguous();
  a.neurons = neurons.contiguous();
  a.B = h.size(0);
  a.T = h.size(1);
  a.F = h.size(2);
  a.K = neurons.size(0);
  a.prefix = prefix;
  a.registers = registers;
  a.patch_values = static_cast<PatchValues>(patch_values);
  a.register_value = static_cast<RegisterValue>(register_value);
  a.tanh = tanh;
  at::Tensor out = at::empty_like(a.h);
  const auto acc = h.options().dtype(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  TtrColumnValues v;
  v.reg = at::empty({a.B, a.K}, acc);
  v.fill = at::empty({a.B, a.K}, acc);
  v.thresh = at::empty({a.B, a.K}, acc);
  if (a.K) ttr_column_values_cuda(a, v);
  ttr_activation_fwd_cuda(a, v, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("ttr", &emu_ttr); }
"""

PATCH_VALUES = ("zero", "mean", "only_outliers", "same")
REGISTER_VALUES = ("signed_max", "max", "layer_signed_max")


def prepare(scratch: Path, shim: Path) -> list[Path]:
    """The emulated sources in ``scratch``: [the .cu as C++, the binding]."""
    inc = scratch / "include" / "dsr_kernels"
    inc.mkdir(parents=True)
    shutil.copy(shim, scratch / "shim.h")
    header = (ROOT / "csrc/include/dsr_kernels/ttr_activation.h").read_text()
    (inc / "ttr_activation.h").write_text(header.replace("namespace dsr_kernels", "namespace dsr_emul"))
    (inc / "cuda_utils.h").write_text(CUDA_UTILS)
    src = (ROOT / "csrc/cuda/ttr_activation.cu").read_text()
    src = src.replace("#include <cuda_runtime.h>\n", "").replace("namespace dsr_kernels", "namespace dsr_emul")
    launch = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
    src, launches = launch.subn(lambda m: f"emu_launch({m.group(1)}, {m.group(2)})(", src)
    if launches < 5:
        raise SystemExit(f"expected the .cu's kernel launches, rewrote {launches}")
    kernels = scratch / "ttr_activation_emu.cpp"
    kernels.write_text(PRELUDE + src)
    binding = scratch / "binding.cpp"
    binding.write_text(BINDING)
    return [kernels, binding]


def cases():
    """(dtype, B, T, F, neurons, registers, prefix, patch, register value, tanh)."""
    small = [
        (torch.float32, 2, 37, 72, [3, 70, 5], 1, 1),
        (torch.bfloat16, 1, 20, 83, [0, 82], 2, 0),
        (torch.float16, 2, 9, 8, [7], 1, 2),
        (torch.float64, 1, 33, 17, [16, 1, 4], 1, 1),
        (torch.float32, 1, 5, 16, [], 1, 0),  # no neurons: GELU
        (torch.float32, 1, 3, 16, [2], 2, 1),  # no patch rows
    ]
    for (dtype, B, T, F, n, R, prefix), patch, reg in itertools.product(small, PATCH_VALUES, REGISTER_VALUES):
        yield dtype, B, T, F, n, R, prefix, patch, reg, patch == "mean"
    # "mean" around the 32 KiB cache: 8192 float / 4096 double patches fit, one more does not
    for dtype, P in ((torch.float32, 8192), (torch.float32, 8193), (torch.float64, 4096), (torch.float64, 4097),
                     (torch.bfloat16, 1000)):  # fmt: skip
        yield dtype, 1, P + 2, 8, [1, 6], 1, 1, "mean", "signed_max", False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shim", type=Path, default=ROOT.parent / "shared/tools/cuda-emu/shim.h")
    args = parser.parse_args(argv)
    if not args.shim.exists():
        print(f"no emulator at {args.shim} (--shim)")
        return 2
    from torch.utils.cpp_extension import load

    import dsr_kernels  # noqa: F401  (the CPU kernel to compare with)

    with tempfile.TemporaryDirectory() as tmp:
        sources = prepare(Path(tmp), args.shim)
        flags = ["-std=c++20", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-DDSR_WITH_CUDA", f"-I{tmp}/include", f"-I{tmp}"]  # fmt: skip
        emu = load("dsr_ttr_emu", [str(s) for s in sources], extra_cflags=flags,
                   extra_ldflags=["-fsanitize=address,undefined"], build_directory=tmp, verbose=False)  # fmt: skip
        failures, count = 0, 0
        for dtype, B, T, F, n, R, prefix, patch, reg, tanh in cases():
            g = torch.Generator().manual_seed(count)
            h = (torch.randn(B, T, F, generator=g) * 3).to(dtype)
            neurons = torch.tensor(n, dtype=torch.long)
            want = torch.ops.dsr_kernels.ttr_activation_fwd(h, neurons, R, prefix, patch, reg, tanh)
            got = emu.ttr(h, neurons, R, prefix, PATCH_VALUES.index(patch), REGISTER_VALUES.index(reg), tanh)
            tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
            ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True)
            count += 1
            if not ok:
                failures += 1
                err = (got.double() - want.double()).abs().nan_to_num(float("inf")).max()
                print(f"DIFF {dtype} B={B} T={T} F={F} neurons={n} R={R} prefix={prefix} {patch} {reg}: {err:.3g}")
        print(f"{count} configurations, {failures} differ from the CPU kernel (sanitizers: ASan + UBSan)")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
