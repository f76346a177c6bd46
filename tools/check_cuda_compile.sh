#!/usr/bin/env bash
# Compiles every CUDA source with nvcc for sm_80 and sm_90a (nothing runs the result):
# run by CI, which has nvcc but no GPU, so a CUDA kernel that does not compile fails CI.
# Uses the headers of the installed torch (a CPU wheel ships the ATen/c10 CUDA headers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
read -r -a TORCH_INC <<<"$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")"
PY_INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  echo "nvcc $src (sm_80, sm_90a)"
  if ! nvcc -c "$src" -o "$OUT_DIR/$(basename "$src").o" -std=c++20 -O3 -Xcompiler -fPIC \
      --expt-relaxed-constexpr -DDSR_WITH_CUDA -Icsrc/include "${TORCH_INC[@]}" -I"$PY_INC" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a; then
    status=1
  fi
done
exit $status
