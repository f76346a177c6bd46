#!/usr/bin/env bash
# Compiles every CUDA source with nvcc exactly as the extension build does (setup.py's
# nvcc_flags(): torch.utils.cpp_extension's flags plus ours, for TORCH_CUDA_ARCH_LIST,
# default 8.0;9.0 as in the build); nothing runs the result. Run by CI, which has nvcc but
# no GPU, so a CUDA kernel that does not compile fails CI. Uses the headers of the
# installed torch (a CPU wheel ships the ATen/c10 CUDA headers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
read -r -a FLAGS <<<"$("$PY" -c "
import runpy, sysconfig
from torch.utils.cpp_extension import include_paths
setup = runpy.run_path('setup.py')  # its functions only: setup() runs under __main__
includes = ['csrc/include', *include_paths(), sysconfig.get_paths()['include']]
print(' '.join(setup['nvcc_flags']() + ['-I' + p for p in includes]))
")"
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  echo "$NVCC -c $src ${FLAGS[*]}"
  if ! "$NVCC" -c "$src" -o "$OUT_DIR/$(basename "$src").o" "${FLAGS[@]}"; then
    status=1
  fi
done
exit $status
