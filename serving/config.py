"""The one configuration model: shared by the CLI, YAML config files, the Serve deployments and the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from adapters.config import TrainerConfig
from selection.config import IndexConfig, ModelsConfig, SelectionConfig, Strict


class GeneratorConfig(Strict):
    """The engine that answers."""

    engine: Literal["vllm", "transformers"] = Field("vllm", description="transformers: the fallback engine")
    max_model_len: int = Field(2048, ge=64)
    max_loras: int = Field(4, ge=1, description="adapters resident at once (concurrent adapted requests)")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters cached in CPU memory (>= max_loras)")
    dtype: str = Field("auto", description="auto: float32 on CPU, the model's dtype on GPU")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)
    default_max_tokens: int = Field(64, ge=1, description="max_tokens for chat requests that set none")

    @model_validator(mode="after")
    def _cpu_loras(self) -> GeneratorConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self


class Resources(Strict):
    """Ray resources of one deployment: always pinned (Ray's default of 1 CPU per replica deadlocks 2 cores)."""

    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(16, ge=1)


class ServerConfig(Strict):
    """The HTTP front and the Ray Serve application."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("SIFT_SERVE_API_KEY") or None,
        description="when set, requests need 'Authorization: Bearer <key>' (default: $SIFT_SERVE_API_KEY)",
    )
    served_model_name: str | None = Field(None, description="model id clients send (default: model dir name)")
    ttft_enabled: bool = Field(True, description="test-time training unless a request opts out")
    max_pending: int = Field(32, ge=1, description="requests in flight before new ones get 429")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may schedule on (default: all)")
    ingress: Resources = Field(default_factory=lambda: Resources(num_cpus=0.25, max_ongoing_requests=64))
    selector: Resources = Field(default_factory=lambda: Resources(num_cpus=0.25, max_ongoing_requests=64))
    trainer: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5, max_ongoing_requests=64))
    generator: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5, max_ongoing_requests=64))


class Settings(Strict):
    """Everything sift-serve can be configured with; each package reads its own section."""

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    index_path: Path | None = Field(None, description="index directory to serve (default: the stdlib index)")

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        """Defaults, overlaid with a YAML file when given (unknown keys are errors)."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
        return cls.model_validate(data)
