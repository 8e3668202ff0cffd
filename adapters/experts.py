"""Expert adapters of an index, as `sift-serve experts build` writes them and the server merges them.

Layout, beside the index (`<index>/experts/`): `manifest.json` (`ExpertManifest`: which index and base model
the experts belong to, their LoRA shape and how they were trained), `keys.npy` (E x d unit keys: each
cluster's normalised mean embedding), `labels.npy` (each index row's cluster), and one PEFT adapter
directory per expert, `0/` ... `E-1/` (`adapter_config.json`, `adapter_model.safetensors`; the layout the
authors' `ttmerge` reads). An expert directory appears whole or not at all, so an interrupted build resumes
from the experts it finished.

`ExpertSet` holds every expert's factors in memory, stacked per projection, and merges the ones a prompt
weighs (`adapters.merge`) into one PEFT adapter in bytes, truncated through its factors above the
requested rank (`adapters.low_rank`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file

from adapters.handle import CONFIG_FILE, WEIGHTS_FILE, AdapterBlob, lora_scaling
from adapters.low_rank import truncate
from adapters.merge import ExpertWeight, MergeOptions, concatenate, expert_weights
from selection.manifest import IndexManifest

log = logging.getLogger(__name__)

EXPERTS_DIR = "experts"
MANIFEST_FILE = "manifest.json"
KEYS_FILE = "keys.npy"
LABELS_FILE = "labels.npy"
FORMAT_VERSION = 1
BUILD_COMMAND = "sift-serve experts build"
_MIB = 1 << 20


class ExpertsMismatchError(ValueError):
    """The experts on disk belong to another index or base model, or are unreadable or incomplete."""


class NoExpertsError(LookupError):
    """The index has no experts (merging needs them)."""


class IndexRef(BaseModel):
    """Which index the experts were clustered from (equal when the index was not rebuilt)."""

    model_config = ConfigDict(frozen=True)

    created: str
    corpus: str | None
    count: int
    embedder: str

    @classmethod
    def of(cls, manifest: IndexManifest) -> IndexRef:
        return cls(
            created=manifest.created, corpus=manifest.corpus, count=manifest.count, embedder=manifest.embedder.name
        )


class ModelRef(BaseModel):
    """Which base model the experts were trained on: its directory name and a fingerprint of its files
    (config.json whole; each weights file's size, first and last MiB)."""

    model_config = ConfigDict(frozen=True)

    name: str
    fingerprint: str

    @classmethod
    def of(cls, model_dir: Path) -> ModelRef:
        model_dir = Path(model_dir)
        digest = hashlib.sha256((model_dir / "config.json").read_bytes())
        for weights in sorted(model_dir.glob("*.safetensors")):
            size = weights.stat().st_size
            with weights.open("rb") as f:
                head = f.read(_MIB)
                f.seek(max(size - _MIB, 0))
                tail = f.read(_MIB)
            digest.update(f"{weights.name}:{size}".encode() + head + tail)
        return cls(name=model_dir.name, fingerprint=digest.hexdigest())


class ExpertPlan(BaseModel):
    """How the experts are built: how many, and how each is trained (one document per step)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: int
    steps: int
    learning_rate: float
    max_train_tokens: int
    seed: int
    rank: int
    lora_alpha: float
    layers: str
    """The trainer's `LayerScope`."""


class ExpertManifest(BaseModel):
    """`experts/manifest.json`: what the experts are, and what they belong to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    index: IndexRef
    model: ModelRef
    plan: ExpertPlan
    sizes: tuple[int, ...]
    """Index rows in each expert's cluster."""

    @staticmethod
    def read(directory: Path) -> ExpertManifest:
        path = Path(directory) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise ExpertsMismatchError(f"{path}: experts format {data.get('format_version')}, not {FORMAT_VERSION}")
            return ExpertManifest.model_validate(data)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError, ValidationError) as exc:
            raise ExpertsMismatchError(f"{path} is not a valid experts manifest ({exc}); rebuild the experts") from exc

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.model_dump_json(indent=2))

    def check(self, index: IndexManifest, model_dir: Path, directory: Path) -> None:
        """Refuse experts of another index or base model."""
        if self.index != IndexRef.of(index):
            raise ExpertsMismatchError(
                f"{directory} holds experts of another index ({self.index.corpus}, {self.index.count} rows, built "
                f"{self.index.created}); rebuild them with `{BUILD_COMMAND} --overwrite`"
            )
        if self.model != ModelRef.of(model_dir):
            raise ExpertsMismatchError(
                f"{directory} holds experts of another base model ({self.model.name}); rebuild them with "
                f"`{BUILD_COMMAND} --overwrite`"
            )


def experts_dir(index_dir: Path) -> Path:
    return Path(index_dir) / EXPERTS_DIR


def expert_dir(directory: Path, k: int) -> Path:
    return Path(directory) / str(k)


def finished(directory: Path, manifest: ExpertManifest) -> list[int]:
    """The experts whose adapter directory is complete."""
    return [k for k in range(manifest.plan.experts) if (expert_dir(directory, k) / WEIGHTS_FILE).is_file()]


def usable_manifest(index_dir: Path, model_dir: Path) -> ExpertManifest:
    """The manifest of the index's experts when they can be merged with `model_dir`: NoExpertsError when
    there are none, ExpertsMismatchError when they belong to another index or model, or are incomplete."""
    directory = experts_dir(index_dir)
    if not (directory / MANIFEST_FILE).is_file():
        raise NoExpertsError(f"{index_dir} has no experts; build them with `{BUILD_COMMAND} {index_dir}`")
    manifest = ExpertManifest.read(directory)
    manifest.check(IndexManifest.read(index_dir), model_dir, directory)
    done = finished(directory, manifest)
    if len(done) < manifest.plan.experts:
        raise ExpertsMismatchError(
            f"{directory}: {len(done)} of {manifest.plan.experts} experts are built; resume with "
            f"`{BUILD_COMMAND} {index_dir} --experts {manifest.plan.experts} --steps {manifest.plan.steps}`"
        )
    return manifest


def unavailable(index_dir: Path, model_dir: Path) -> str | None:
    """Why the index's experts cannot be merged (None: they can)."""
    try:
        usable_manifest(index_dir, model_dir)
    except (NoExpertsError, ExpertsMismatchError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Merged:
    """One prompt's merge: the adapter (None when no expert clears the threshold), which experts with which
    weights, its rank and the truncation's relative Frobenius error (0 when exact)."""

    adapter: AdapterBlob | None
    experts: tuple[ExpertWeight, ...]
    rank: int
    relative_error: float


class ExpertSet:
    """Every expert of an index in memory, ready to merge."""

    def __init__(self, keys: np.ndarray, config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.keys, self._config = keys, config
        self._factors = factors
        """module -> (A (E, r, in), B (E, out, r) already scaled by s_k)"""

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, index_dir: Path, model_dir: Path) -> ExpertSet:
        """The experts beside the index in `index_dir`. NoExpertsError when there are none;
        ExpertsMismatchError when they belong to another index or model, or are incomplete."""
        directory = experts_dir(index_dir)
        manifest = usable_manifest(index_dir, model_dir)
        experts = [expert_dir(directory, k) for k in range(manifest.plan.experts)]
        loaded = cls.read(experts, np.load(directory / KEYS_FILE))
        log.info("loaded %d experts from %s", len(loaded), directory)
        return loaded

    @classmethod
    def read(cls, experts: Sequence[Path], keys: np.ndarray) -> ExpertSet:
        """Experts from PEFT adapter directories (expert k's key is `keys[k]`)."""
        if len(experts) != len(keys) or not experts:
            raise ValueError(f"{len(experts)} expert directories for {len(keys)} keys")
        stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for expert in experts:
            scale = lora_scaling(json.loads((Path(expert) / CONFIG_FILE).read_text()))
            for name, tensor in sorted(load_file(Path(expert) / WEIGHTS_FILE).items()):
                module, part = name.split(".lora_", 1)
                a, b = stacked.setdefault(module, ([], []))
                if part.startswith("A."):
                    a.append(tensor.float())
                else:
                    b.append(tensor.float() * scale)
        config = json.loads((Path(experts[0]) / CONFIG_FILE).read_text())
        return cls(keys, config, {m: (torch.stack(a), torch.stack(b)) for m, (a, b) in stacked.items()})

    def merge(self, query: np.ndarray, options: MergeOptions) -> Merged:
        """The adapter for a prompt embedded as `query`: its experts' deltas summed (`adapters.merge`), cut
        to `options.rank` through the factors when their ranks add up to more."""
        chosen = expert_weights(query, self.keys, options)
        if not chosen:
            return Merged(None, (), 0, 0.0)
        index = torch.tensor([c.expert for c in chosen])
        scales = [c.weight for c in chosen]
        tensors, dropped, total, rank = {}, 0.0, 0.0, 0
        for module, (a_all, b_all) in self._factors.items():
            a, b = concatenate(list(a_all[index]), list(b_all[index]), scales)
            cut = truncate(a, b, options.rank)
            dropped, total, rank = dropped + cut.dropped, total + cut.total, cut.a.shape[0]
            tensors[f"{module}.lora_A.weight"] = cut.a.contiguous()
            tensors[f"{module}.lora_B.weight"] = cut.b.contiguous()
        config = {**self._config, "r": rank, "lora_alpha": rank}  # scaling 1: the weights are in B
        error = (dropped / total) ** 0.5 if total > 0 else 0.0
        return Merged(AdapterBlob.of(tensors, json.dumps(config, indent=2, sort_keys=True)), tuple(chosen), rank, error)
