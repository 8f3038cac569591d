#!/usr/bin/env bash
# The GPU session's checks in one command (the device tool runs it in the repo root; the
# H200 image's own python3 has all it needs).  Three runs of bench.gpu_check, within ~9
# minutes, each cut off by its own timeout (a run cut short keeps what it measured):
#   1. the defaults, eager vs CUDA graphs, profiled               -> gpu_check.json
#   2. CUDA graphs with --compile, profiled                        -> gpu_check_compile.json
#   3. CUDA graphs, prefill chunk 4096 and 8 preparation workers
#      (the image path)                                            -> gpu_check_prefill.json
# plus log.txt and each profiled run's tables and traces as one .tgz: 6 files in OUT (the
# device tool brings back at most 8).
#
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
set -u
PY=${PY:-python3}  # the H200 image's python; PY=.venv/bin/python for a dry run on CPU
OUT=${OUT:-bench/results/gpu_session}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log() { grep -v USDT | tee -a "$OUT/log.txt"; }
check() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  mkdir -p "$WORK/$name"
  timeout "$limit" "$PY" -m bench.gpu_check --out "$WORK/$name/$name.json" "$@" 2>&1 | log
  cp "$WORK/$name/$name.json" "$OUT/" 2>/dev/null
  if ls "$WORK/$name"/profile_* >/dev/null 2>&1; then
    tar -czf "$OUT/$name-profiles.tgz" -C "$WORK/$name" --exclude "$name.json" .
  fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | log
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)" 2>&1 | log
check gpu_check "${T1:-240}" --profile
check gpu_check_compile "${T2:-200}" --modes graphs --set compile=True --profile
check gpu_check_prefill "${T3:-120}" --modes graphs --set max_prefill_chunk=4096 --set prep_workers=8
ls -l "$OUT" | log
rm -rf "$WORK"
