#!/usr/bin/env bash
# One GPU lease, one script (well under 8 minutes on one H100/H200):
#   1. install the package against the machine's torch/triton (no downloads),
#   2. measure the card's ceilings (bf16 matmul rate, copy bandwidth),
#   3. run the tests marked gpu (real Triton kernels on CUDA vs the float64 reference),
#   4. run the attention and norm_modulate benchmarks on the default GPU shapes (and
#      head dim 80 split vs padded), the whole-model register overhead (XL models), and the
#      encoder's (trained, test-time and recursive test-time registers, hook baseline),
#   5. merge everything into $OUT/gpu_check.json and print a short table last.
# Usage: OUT=/some/dir benchmarks/gpu_check.sh [--dry-run]
# --dry-run (for a CPU machine) skips what needs CUDA and benchmarks one tiny shape.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
# Per-run JSON/CSV go to a scratch folder; the summary merges them into $OUT/gpu_check.json
# (the lease returns at most 8 files: gpu_check.json, gpu_check.log, gpu-tests.xml).
RUNS="$(mktemp -d)"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
status=0
exec > >(tee "$OUT/gpu_check.log") 2>&1  # (not a pipeline: status must survive the steps)

{
  echo "== install"
  timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -q || status=1
  "$PY" -m dsr_kernels.cli info

  if [[ $DRY_RUN == 0 ]]; then
    echo "== ceilings"
    timeout 60 "$PY" benchmarks/gpu_ceilings.py "$OUT/ceilings.json" || status=1
  fi

  echo "== gpu tests"
  timeout 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests || status=1

  echo "== benchmarks"
  if [[ $DRY_RUN == 0 ]]; then
    timeout 200 "$PY" -m dsr_kernels.cli bench --op attention --budget 0.4 --out "$RUNS" \
      --shapes dsr-dit-xl,dit-b,n1024,n4096,n4096-d128 || status=1
    timeout 60 "$PY" -m dsr_kernels.cli bench --op attention --budget 0.4 --out "$RUNS/headdim" \
      --shape 256,16,256,80,36 --modes fwd,full --providers dsr,dsr_pad,sdpa_flash_cat || status=1
    timeout 90 "$PY" -m dsr_kernels.cli bench --op norm_modulate --budget 0.4 --out "$RUNS" || status=1
    timeout 150 "$PY" -m dsr_kernels.cli bench --op models --budget 0.4 --out "$RUNS" \
      --shapes LightningDiT-XL/1,DiT-XL/2 --registers 0,16,36,64 || status=1
    timeout 120 "$PY" -m dsr_kernels.cli bench --op encoder --budget 0.5 --out "$RUNS" || status=1
  else
    timeout 240 "$PY" -m dsr_kernels.cli bench --op attention --device cpu --budget 0.1 --out "$RUNS" \
      --shape 1,2,64,72,4 --modes fwd,bwd || status=1
    timeout 240 "$PY" -m dsr_kernels.cli bench --op norm_modulate --device cpu --budget 0.1 --out "$RUNS" \
      --shape 2,64,72,4 --modes fwd,bwd || status=1
    timeout 240 "$PY" -m dsr_kernels.cli bench --op models --device cpu --budget 0.1 --out "$RUNS" \
      --shapes LightningDiT-S/1 --registers 0,36 --modes fwd || status=1
    timeout 240 "$PY" -m dsr_kernels.cli bench --op encoder --device cpu --budget 0.05 --out "$RUNS" \
      --shapes vit_base_patch16_siglip_256 || status=1
  fi

  echo "== summary"
  "$PY" benchmarks/gpu_summary.py "$RUNS" "$OUT" || status=1
}
exit $status
