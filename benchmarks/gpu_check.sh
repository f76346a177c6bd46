#!/usr/bin/env bash
# One GPU lease, one script (well under 8 minutes on one H100/H200):
#   1. install the package against the machine's torch/triton (no downloads),
#   2. measure the card's ceilings (bf16 matmul rate, copy bandwidth),
#   3. run the tests marked gpu (real Triton kernels on CUDA vs the float64 reference),
#   4. run `dsr-kernels bench` (self-check, attention, norm_modulate, XL models, encoders),
#      head dim 80 split vs padded, and the larger models and So400M encoder,
#   5. time each Triton launch of benchmarks/kernel_report.py's target shapes against its
#      predicted time (kernel_model.json),
#   6. merge everything into $OUT/gpu_check.json and print a short table last.
# Usage: OUT=/some/dir benchmarks/gpu_check.sh [--dry-run]
# --dry-run (for a CPU machine) skips what needs CUDA and benchmarks one tiny shape.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
# Bench run folders go to a scratch folder; the summary merges their results.json into
# $OUT/gpu_check.json and bench-runs.tgz carries the folders (plots included): the lease
# returns at most 8 files (gpu_check.json, gpu_check.log, gpu-tests.xml, ceilings.json, the tgz).
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
  timeout 260 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests || status=1

  echo "== benchmarks"
  # The main job on the GPU (every section, default preset: about 2 minutes), then head
  # dim 80 split vs padded, and the larger models and encoders of --full.
  if [[ $DRY_RUN == 0 ]]; then
    timeout 240 "$PY" -m dsr_kernels bench --device cuda --out "$RUNS" || status=1
    timeout 60 "$PY" -m dsr_kernels bench --device cuda --section attention --shapes dsr-dit-xl-d80 \
      --registers 0,36 --providers dsr,dsr_pad,sdpa_flash_cat --out "$RUNS" || status=1
    timeout 150 "$PY" -m dsr_kernels bench --device cuda --section models,encoder --full --registers 0,36 \
      --shapes DiTDH-XL/1,JiT-H/16,vit_so400m_patch14_siglip_224 --out "$RUNS" || status=1
    # A DiT-S training step with every statistic recorded (key mass from the backward) vs without.
    timeout 60 "$PY" benchmarks/bench_training_stats.py --budget 20 --out "$OUT" || status=1
  else
    timeout 240 "$PY" -m dsr_kernels bench --device cpu --quick --section selfcheck,attention,norm_modulate \
      --out "$RUNS" || status=1
  fi
  tar czf "$OUT/bench-runs.tgz" -C "$RUNS" . || status=1

  if [[ $DRY_RUN == 0 ]]; then
    echo "== kernel model"
    # Each Triton launch of the report's target shapes timed (torch.profiler) against the
    # roofline prediction committed in benchmarks/results/kernels-sm90/report.json.
    timeout 150 "$PY" benchmarks/kernel_report.py --measure --out "$OUT" || status=1
  fi

  echo "== summary"
  "$PY" benchmarks/gpu_summary.py "$RUNS" "$OUT" || status=1
}
exit $status
