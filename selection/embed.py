"""Text embedders: MiniLM (default) and the base model's own mean-pooled last hidden state.

Both return float32 L2-normalised vectors, batched, with a progress bar on long inputs. An embedder has
a `name` and a `fingerprint` (its vector for a fixed probe text) so an index can tell whether the
embedder loaded now is the one it was built with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from infra.config import resolve_device

log = logging.getLogger(__name__)

PROBE_TEXT = "SIFT selects the data that is most informative for the prompt."


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def fingerprint(embedder: Embedder) -> list[float]:
    """The embedder's vector for a fixed probe text: equal embedders give (nearly) equal fingerprints."""
    return embedder.embed([PROBE_TEXT])[0].tolist()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d, 256 word pieces at most) through sentence-transformers, offline."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device)
        self.name = "minilm:all-MiniLM-L6-v2"
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class LMEmbedder:
    """The causal LM's last hidden state, mean-pooled over real tokens and L2-normalised."""

    def __init__(self, model_dir: Path, device: str = "cpu", max_tokens: int = 512) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens
        self.name = f"lm:{Path(model_dir).name}"
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 8, progress: bool = False) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out[start : start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def load_embedder(kind: str, model_dir: Path | None, device: str = "cpu") -> Embedder:
    """'minilm' or 'base-model' (which needs the base model's directory), on `device` ('auto' allowed)."""
    device = resolve_device(device)
    if kind == "minilm":
        from infra.models import minilm_path

        return MiniLMEmbedder(minilm_path(), device=device)
    if kind == "base-model":
        if model_dir is None:
            raise ValueError("the base-model embedder needs the base model's directory")
        return LMEmbedder(model_dir, device=device)
    raise ValueError(f"unknown embedder {kind!r} (use 'minilm' or 'base-model')")
