#!/usr/bin/env bash
# The GPU session's checks in one command, within ~6 minutes (the device tool runs it in
# the repo root; the GPU image's own python3 has all it needs).  One run of
# bench.gpu_check: one model build, CUDA graphs only, profiled:
#   - batch-1 time per token and its profile, decode at batch 16 and 64 (a trace of 4
#     steps mid-decode at 64);
#   - one-image TTFT and its profile;
#   - the burst of 64 fresh 1024px photo requests at the default step budget
#     (--max-num-batched-tokens: 8192 on GPUs of >= 70 GiB) and again at 1,024, each with
#     per-stage timers (preparation, admission, encoder, prefill, decode; host and
#     CUDA-event time), the first with a profile of 3 early engine steps;
#   - graphs == eager is not re-measured here (known: bench/results/gpu_check_h200.json);
#   - decode only (issue 30), beside graphs: "reference" (--kernels torch: the gather +
#     SDPA attention and the ops' torch references) and "compiled" (--compile), each with
#     batch-1 time per token and its profile (kernels per token) and decode at 16 and 64;
#     the JSON is rewritten after every part, so a run cut at T1 keeps what it measured.
# Files in OUT (the device tool brings back at most 8): log.txt (versions: nvidia-smi,
# torch, transformers, triton, gcc/nvcc present?), gpu_check.json, gpu_check-profiles.tgz.
#
#   run(command="bash bench/gpu_session.sh", timeout_s=420)
set -u
PY=${PY:-python3}  # the GPU image's python; PY=.venv/bin/python for a dry run on CPU
OUT=${OUT:-bench/results/gpu_session}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log() { grep -v USDT | tee -a "$OUT/log.txt"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  for tool in gcc nvcc; do command -v $tool >/dev/null && echo "$tool: $($tool --version | head -1)" || echo "$tool: absent"; done
} | log
mkdir -p "$WORK/gpu_check"
# GPU_CHECK_ARGS: more gpu_check flags (the CPU dry run sets a step budget above 1,024)
timeout "${T1:-330}" "$PY" -m bench.gpu_check --modes graphs,reference,compiled --profile ${GPU_CHECK_ARGS:-} \
  --out "$WORK/gpu_check/gpu_check.json" 2>&1 | log
cp "$WORK/gpu_check/gpu_check.json" "$OUT/" 2>/dev/null
if ls "$WORK/gpu_check"/profile_* >/dev/null 2>&1; then
  tar -czf "$OUT/gpu_check-profiles.tgz" -C "$WORK/gpu_check" --exclude gpu_check.json .
fi
ls -l "$OUT" | log
rm -rf "$WORK"
