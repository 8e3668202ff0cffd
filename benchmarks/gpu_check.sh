#!/usr/bin/env bash
# The batched trainer on a GPU, as one short run (about 3 minutes on an H200): training throughput at
# max_batch 1, 4 and 16 (1024-token windows, the paper's size) against the GPU's measured bf16 matmul peak.
#
# The GPU machine has torch, transformers, peft and safetensors but no network, no pydantic and no model,
# so the run is prepared here:
#   bash benchmarks/gpu_check.sh prepare     # on the CPU machine: wheels + the default model's config and
#                                            # tokenizer (no weights) into .gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh run         # on the GPU machine (device tool: carry .gpu): random weights
#                                            # of the same architecture (speed does not depend on values)
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with small sizes (what CI and this machine can check).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
OUT_DIR="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"

prepare() {
  mkdir -p "$GPU/wheels" "$GPU/model"
  grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >> .git/info/exclude
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$GPU/wheels" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  .venv/bin/python - "$GPU/model" <<'PY'
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
  du -sh "$GPU"
}

run() {
  local device=cuda tokens=1024 batches="1 4 16" requests=16
  if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
    device=cpu tokens=32 batches="1 2" requests=2 PY=.venv/bin/python
  else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/wheels/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi
  mkdir -p "$OUT_DIR"
  local model=/tmp/sift-serve-gpu-model
  "$PY" - "$GPU/model" "$model" "$device" <<'PY'
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
source, target, device = sys.argv[1:]
shutil.copytree(source, target, dirs_exist_ok=True)
config = AutoConfig.from_pretrained(source)
if device == "cpu":  # dry run: a tiny model of the same family
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
    config.num_attention_heads, config.num_key_value_heads = 4, 2
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(target)
print(f"random-weight model of {config.num_hidden_layers} layers in {target}")
PY
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || true
  timeout 240 "$PY" -m benchmarks.trainer_speed --model "$model" --device "$device" --tokens "$tokens" \
    --steps 4 --requests "$requests" --batches $batches --out "$OUT_DIR/trainer_speed.json"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
