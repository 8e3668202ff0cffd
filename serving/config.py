"""The one configuration model: shared by the CLI, YAML config files, the Serve deployments and the tests.

Sources, strongest first: command-line flags (or inline sections given to `Settings.load`), environment
variables `SIFT_SERVE_<SECTION>__<KEY>` (e.g. `SIFT_SERVE_ADAPTATION__MAX_STEPS=8`), the YAML file, the
defaults. Sections are merged key by key, so a file plus `adaptation: {max_steps: 4}` keeps the file's other
adaptation keys. Each section says what it holds: `adaptation` the request defaults, `trainer` the
adapters' shape and the training engine, `generator` the answering engine, `server` HTTP, auth and the
ceilings of request options, `deploy` the Ray resources of each deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from adapters.config import TrainerConfig
from infra.config import Strict
from selection.config import IndexConfig, ModelsConfig
from selection.rules import Method
from selection.stopping import DEFAULT_GAIN_BUDGET, DEFAULT_MIN_GAIN, MIN_LAMBDA


class ContextMode(StrEnum):
    """Where the selected documents go besides training."""

    NONE = "none"
    """Only into the adapter (test-time training)."""
    PREPEND = "prepend"
    """Also into the prompt, before the user's text (in-context retrieval), up to a token budget."""


class AdaptationMode(StrEnum):
    """How a request gets its adapter."""

    TRAIN = "train"
    """SIFT picks documents and a fresh LoRA is trained on them."""
    MERGE = "merge"
    """The index's expert adapters are weighed by the prompt and merged (`sift-serve experts build` first)."""
    MERGE_TRAIN = "merge+train"
    """The merged adapter is where SIFT training starts."""


OWN_ENGINE_ARGS = {
    "model": "set by models.base_model",
    "max_model_len": "set generator.max_model_len",
    "dtype": "set generator.dtype",
    "gpu_memory_utilization": "set generator.gpu_memory_utilization",
    "max_loras": "set generator.max_loras",
    "max_cpu_loras": "set generator.max_cpu_loras",
    "enable_lora": "always on (every adapted answer is a LoRA)",
    "max_lora_rank": "follows trainer.rank and adaptation.merge_rank",
    "device": "set generator.device",
}
"""vLLM engine arguments that sift-serve sets from its own settings, and where to set them instead."""


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
    device: str = Field("cpu", description="the engine's device: cpu, cuda, cuda:0, ... or auto")
    adapter_dir: Path | None = Field(
        None, description="where this node writes the adapters it loads (default: tmpfs, /dev/shm, if present)"
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template, or the path of a file with one (default: the tokenizer's own)"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="more vLLM engine arguments by their vLLM names (tensor_parallel_size, quantization, "
        "max_num_seqs, enable_prefix_caching, ...); vLLM checks them when the engine starts",
    )

    @field_validator("engine_args")
    @classmethod
    def _not_ours(cls, args: dict[str, Any]) -> dict[str, Any]:
        for key in args:
            if key in OWN_ENGINE_ARGS:
                raise ValueError(f"generator.engine_args.{key}: {OWN_ENGINE_ARGS[key]}")
        return args

    @model_validator(mode="after")
    def _cpu_loras(self) -> GeneratorConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self


class Autoscaling(Strict):
    """Ray Serve's autoscaling for a stateless deployment (Ingress, Selector): replicas follow the load."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica Serve scales towards")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class Resources(Strict):
    """Ray resources of one deployment: always pinned (Ray's default of 1 CPU per replica deadlocks 2 cores).

    `resources` places replicas by custom node resources (e.g. `{index_shard: 1}` on CPU nodes started with
    `ray start --resources '{"index_shard": 4}'`); `num_gpus` may be fractional, so deployments share a GPU."""

    num_cpus: float = Field(gt=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: Autoscaling | None = Field(None, description="Ray Serve autoscaling instead of fixed replicas")
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(
        -1, ge=-1, description="requests waiting for a replica before new ones are refused (-1: no limit)"
    )


class Limited:
    """Marks an `adaptation` setting whose request option is capped by `server.limits.<same name>`."""


class AdaptationConfig(Strict):
    """What a request's `adaptation` object falls back to: every field here is the default of the option of
    the same name (the request's `adaptation.<name>`), within `server.limits`."""

    enabled: bool = Field(True, description="test-time training unless a request opts out")
    mode: AdaptationMode = Field(
        AdaptationMode.TRAIN, description="train, merge (the index's experts), or merge+train (start from the merge)"
    )
    method: Method = Method.SIFT
    lambda_: float = Field(0.01, ge=MIN_LAMBDA, alias="lambda")
    alpha: float | None = Field(
        None, gt=0, description="the paper's rule instead or as well: stop once sigma_n > 1/(alpha n)"
    )
    candidates: Annotated[int, Limited()] = Field(
        200, gt=0, le=10000, description="K: documents retrieved from Faiss by |cos|"
    )
    min_gain: float = Field(
        DEFAULT_MIN_GAIN,
        ge=0,
        description="the marginal rule: stop training once a step no longer removes this share of the prompt's "
        "uncertainty per 1,000 tokens it trains on (0, the default: off)",
    )
    gain_budget: float | None = Field(
        DEFAULT_GAIN_BUDGET,
        ge=0,
        description="the gain-budget rule: of max_steps picks, train on the first n while V log(1 + 1/n) is at "
        "least this, V being the share of the prompt's uncertainty all the picks remove (None: off; the default "
        "is calibrated on the quality benchmark's dev prompts)",
    )
    max_steps: Annotated[int, Limited()] = Field(
        4, ge=0, le=1000, description="most optimizer steps: one per picked document"
    )
    learning_rate: float = Field(
        1e-3, gt=0, le=1.0, description="SIFT's best rate on the quality benchmark's new-knowledge dev prompts"
    )
    max_train_tokens: Annotated[int, Limited()] = Field(
        256, ge=2, le=32768, description="documents are truncated to this"
    )
    time_budget_s: Annotated[float | None, Limited()] = Field(20.0, gt=0, description="wall-clock budget for training")
    context: ContextMode = Field(ContextMode.NONE, description="prepend: selected documents also go into the prompt")
    context_tokens: Annotated[int, Limited()] = Field(
        600, ge=1, description="most prompt tokens the prepended documents may add (whole documents only)"
    )
    context_documents: int = Field(
        50, gt=0, le=1000, description="documents picked to fill the context (context: prepend)"
    )
    merge_beta: float = Field(
        0.2, gt=0, le=10, description="merging's kernel width: smaller trusts the nearest experts"
    )
    merge_threshold: float = Field(
        0.01, ge=0, lt=1, description="tau: experts whose normalised weight is at most this are left out of a merge"
    )
    merge_experts: Annotated[int, Limited()] = Field(50, ge=1, description="M: most experts in one merge")
    merge_rank: int = Field(
        16,
        ge=1,
        le=256,
        description="most rank of a merged adapter (above it, truncated through its factors; merge+train uses "
        "trainer.rank); not a request option: the engine's LoRA buffers are sized for it",
    )


LIMITED = tuple(
    name
    for name, field in AdaptationConfig.model_fields.items()
    if any(isinstance(meta, Limited) for meta in field.metadata)
)
"""The `adaptation` options that `server.limits` caps, each by the limit of its own name."""


class AdaptationLimits(Strict):
    """The most one request may ask for; more is a 400 naming the limit. Each `adaptation` option marked
    `Limited` is checked against the limit of its own name (and so is its configured default)."""

    max_steps: int = Field(32, ge=0, le=1000)
    candidates: int = Field(1000, ge=1, le=10000)
    time_budget_s: float = Field(120.0, gt=0)
    max_train_tokens: int = Field(1024, ge=2, le=32768)
    n: int = Field(8, ge=1, le=128, description="most choices per request")
    context_tokens: int = Field(2048, ge=1, description="most prompt tokens prepended documents may add")
    merge_experts: int = Field(64, ge=1, description="most experts one request may merge")


class DeployConfig(Strict):
    """Ray resources and replicas of each Serve deployment, and of the local Ray instance."""

    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may schedule on (default: all)")
    ingress: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0.25, max_ongoing_requests=64, max_queued_requests=64)
    )
    selector: Resources = Field(default_factory=lambda: Resources(num_cpus=0.25, max_ongoing_requests=64))
    shard: Resources = Field(
        default_factory=lambda: Resources(num_cpus=0.25, max_ongoing_requests=64),
        description="each index shard's deployment (when the index is sharded)",
    )
    trainer: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5, max_ongoing_requests=64))
    generator: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5, max_ongoing_requests=64))

    @model_validator(mode="after")
    def _stateful_parts_fixed(self) -> DeployConfig:
        for name in ("trainer", "generator", "shard"):
            if getattr(self, name).autoscaling is not None:
                raise ValueError(f"deploy.{name} keeps state (a model or an index shard): give it fixed replicas")
        if self.selector.autoscaling is not None and self.selector.autoscaling.min_replicas == 0:
            raise ValueError(
                "deploy.selector.autoscaling.min_replicas must be >= 1: a request needs a running Selector "
                "replica to be admitted, so a Selector scaled to zero would never scale up again"
            )
        return self


class SessionsConfig(Strict):
    """Conversations that keep their adapter between turns (`adaptation.session`), held by the Trainer."""

    ttl_s: float = Field(900.0, gt=0, description="a session unused this long is dropped")
    max_bytes: int = Field(
        512 * 2**20, ge=0, description="sessions' training state kept per Trainer replica, least recently used out"
    )
    max_turns: int = Field(32, ge=1, description="a session that took this many turns starts over")


class ServerConfig(Strict):
    """The HTTP front and the Ray Serve application."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(
        default_factory=list, description="when any is set, requests need 'Authorization: Bearer <key>'"
    )
    api_key_file: Path | None = Field(None, description="a file with one more API key per line")
    metrics_public: bool = Field(False, description="serve /metrics without an API key")
    served_model_name: str | None = Field(None, description="model id clients send (default: model dir name)")
    limits: AdaptationLimits = Field(default_factory=AdaptationLimits)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    retry_after_s: float = Field(
        1.0,
        ge=0,
        description="Retry-After of refusals: Serve's 429 when the Ingress queue is full, the "
        "`overloaded` 429 and the `unavailable` 503",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (default: none)")
    heartbeat_s: float = Field(10.0, gt=0, le=10, description="SSE comment interval while a stream is silent")
    shard_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a sharded index's search that a shard leaves unanswered this long fails once, "
        "for the whole batch; its requests are answered by the base model",
    )

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            _check_key(key, "server.api_keys")
        return keys

    def keys(self) -> list[str]:
        """Every accepted API key: the configured list plus the key file's non-empty lines. A key file
        without any key is an error (auth would silently be off)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            lines = [line.strip() for line in Path(self.api_key_file).read_text().splitlines()]
            from_file = [line for line in lines if line]
            if not from_file:
                raise ValueError(f"server.api_key_file {self.api_key_file} holds no key")
            keys += from_file
        return keys


def _check_key(key: str, where: str) -> None:
    """An API key must be a real secret: empty or blank keys would match a request without credentials."""
    if not key.strip():
        raise ValueError(
            f"{where} holds an empty or blank key, which would let requests without a key in; "
            "remove it (was --api-key given an unset variable?)"
        )
    if key != key.strip():
        raise ValueError(f"{where} holds a key with leading or trailing white space; remove the white space")


_file_data: ContextVar[Mapping[str, Any] | None] = ContextVar("sift_serve_config_file", default=None)


class _YamlFile(PydanticBaseSettingsSource):
    """The YAML config file's sections, below the environment and above the defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_file_data.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get() or {})


class Settings(BaseSettings):
    """Everything sift-serve can be configured with; each package reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="SIFT_SERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        populate_by_name=True,
        allow_inf_nan=False,
    )

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    index_path: Path | None = Field(None, description="index directory to serve (default: the stdlib index)")

    @property
    def max_adapter_rank(self) -> int:
        """The largest LoRA rank the engine must load: trained adapters and merged ones."""
        return max(self.trainer.rank, self.adaptation.merge_rank)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        limits = self.server.limits
        for name in LIMITED:
            value, cap = getattr(self.adaptation, name), getattr(limits, name)
            if value is not None and value > cap:
                raise ValueError(f"adaptation.{name} ({value}) is above server.limits.{name} ({cap})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFile(settings_cls)

    @classmethod
    def load(cls, path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
        """Defaults < YAML file (when given) < environment < `overrides` (nested sections, merged per key)."""
        data: Mapping[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: a config file must be a mapping of sections")
        token = _file_data.set(data)
        try:
            return cls(**dict(overrides or {}))
        finally:
            _file_data.reset(token)
