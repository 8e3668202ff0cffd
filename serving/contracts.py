"""The request-level contract: what one request asks of each service, and what comes back, fully resolved.

Plain data (no tensors, no model, no Ray), so every layer and every process shares these types. `resolve`
is the one place where a request's `adaptation` options meet the server's defaults (the `adaptation`
section) and ceilings (`server.limits`): everything below the route receives the resolved
`AdaptationSpec` (or the part of it that it needs: `SelectOptions` for selection, `TrainSpec` for
training), never an optional that it would have to default itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.merge import MergeOptions
from adapters.spec import TrainSpec
from selection.selector import GivenDocument, SelectOptions
from serving.config import LIMITED, AdaptationMode, ContextMode, Settings

if TYPE_CHECKING:
    from adapters.handle import AdapterBlob
    from serving.protocol import AdaptationOptions


@dataclass(frozen=True)
class ContextSpec:
    """In-context retrieval: whether the picked documents also go before the prompt, and the token budget."""

    mode: ContextMode
    tokens: int
    """Most prompt tokens the documents may add (whole documents only)."""


@dataclass(frozen=True)
class SessionRef:
    """A conversation: the id its client sent, and the key the Trainer keeps it under (namespaced by the
    caller's API key, so no caller reaches another's session whatever id it sends)."""

    id: str
    key: str

    @classmethod
    def of(cls, caller: str, session: str) -> SessionRef:
        return cls(session, f"{caller}/{session}")


@dataclass(frozen=True)
class AdaptationSpec:
    """What adaptation one request gets, after defaults and limits."""

    enabled: bool
    mode: AdaptationMode
    merge: MergeOptions
    """How experts are weighed and merged (used in merge and merge+train)."""
    selection: SelectOptions
    """How documents are picked: `max_steps` of them to train on, or `context_documents` to fill the
    context from."""
    training: TrainSpec
    context: ContextSpec
    progress: bool
    """Whether the stream carries `adaptation.progress` events before the first token."""
    session: SessionRef | None = None
    """The conversation this request is a turn of (its id namespaced by the caller)."""

    @property
    def merges(self) -> bool:
        """Whether the adapter starts from a merge of the index's experts."""
        return self.enabled and self.mode is not AdaptationMode.TRAIN

    @property
    def selects(self) -> bool:
        """Whether this request runs selection: to train, or to fill its context."""
        return self.trains or (self.enabled and self.context.mode is ContextMode.PREPEND)

    @property
    def trains(self) -> bool:
        return self.enabled and self.mode is not AdaptationMode.MERGE and self.training.max_steps > 0

    @property
    def context_budget(self) -> int:
        """Prompt tokens the documents may add (0 without in-context retrieval)."""
        return self.context.tokens if self.enabled and self.context.mode is ContextMode.PREPEND else 0


def resolve(options: AdaptationOptions | None, settings: Settings, caller: str = "") -> AdaptationSpec:
    """The request's adaptation within the server's limits: a 400 naming the limit for an option above it,
    for `enabled: true` where the operator switched adaptation off, and for a session without training.
    `caller` namespaces the session (the hash of the API key the request came with)."""
    from serving.errors import bad_request  # the wire models import this module's types
    from serving.protocol import AdaptationOptions

    opts = options or AdaptationOptions()
    defaults, limits = settings.adaptation, settings.server.limits
    if opts.enabled and not defaults.enabled:
        raise bad_request("adaptation is switched off on this server", "adaptation.enabled", "adaptation_disabled")
    for name in LIMITED:
        value, cap = getattr(opts, name), getattr(limits, name)
        if value is not None and value > cap:
            message = f"adaptation.{name} is {value}; this server allows at most {cap} (server.limits.{name})"
            raise bad_request(message, f"adaptation.{name}", "limit_exceeded")

    def pick(name: str) -> Any:
        """The request's option `name`, or the `adaptation` section's default of the same name."""
        value = getattr(opts, name)
        return getattr(defaults, name) if value is None else value

    context = ContextSpec(mode=pick("context"), tokens=pick("context_tokens"))
    training = TrainSpec(
        max_steps=pick("max_steps"),
        learning_rate=pick("learning_rate"),
        max_train_tokens=pick("max_train_tokens"),
        time_budget_s=pick("time_budget_s"),
        seed=settings.trainer.seed,
    )
    picks = defaults.context_documents if context.mode is ContextMode.PREPEND else training.max_steps
    selection = SelectOptions(
        n=picks,
        method=pick("method"),
        lambda_=pick("lambda_"),
        alpha=pick("alpha"),
        candidates=pick("candidates"),
        min_gain=pick("min_gain"),
        step_tokens=training.max_train_tokens,
        gain_budget=pick("gain_budget"),
    )
    mode = pick("mode")
    merge = MergeOptions(
        beta=pick("merge_beta"),
        threshold=pick("merge_threshold"),
        max_experts=pick("merge_experts"),
        rank=settings.trainer.rank if mode is AdaptationMode.MERGE_TRAIN else defaults.merge_rank,
    )
    spec = AdaptationSpec(
        enabled=pick("enabled"),
        mode=mode,
        merge=merge,
        selection=selection,
        training=training,
        context=context,
        progress=opts.progress,
        session=SessionRef.of(caller, opts.session) if opts.session is not None else None,
    )
    if spec.session is not None and not spec.trains:
        message = "adaptation.session carries a trained adapter between turns: it needs training (mode train or "
        message += "merge+train, max_steps above 0, adaptation enabled)"
        raise bad_request(message, "adaptation.session", "session_without_training")
    return spec


@dataclass(frozen=True)
class SelectQuery:
    """One prompt's selection, and how to select."""

    prompt: str
    options: SelectOptions
    given: tuple[GivenDocument, ...] = ()
    """Documents already trained on in this conversation: selection conditions on them first."""


@dataclass(frozen=True)
class SessionTurn:
    """What the Trainer holds for a conversation as a turn starts: its turn number (1: fresh), the
    documents trained on so far, the steps they took, and why it starts fresh (None: it continues)."""

    turn: int
    documents: tuple[GivenDocument, ...]
    steps: int
    fresh: str | None


@dataclass(frozen=True)
class MergeQuery:
    """One prompt's merge of the index's experts, and how to weigh and cut it."""

    prompt: str
    options: MergeOptions


TokenLogprobs = dict[int, float]
"""{token id: logprob} for one position, the chosen token first, then the top alternatives."""


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a request falls back to when it sets none: the model's generation_config.json
    (as vLLM does), else the OpenAI defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model(cls, model_dir: Path) -> SamplingDefaults:
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        config = json.loads(path.read_text())
        known = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        return cls(**known)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request, engine-neutral (vLLM's SamplingParams vocabulary).

    top_k 0 and min_p 0 switch those filters off; `n` choices are sampled from one prompt (and adapter).
    """

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Log-probabilities of generated tokens with this many alternatives; None for none."""
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's tokens (echo) with this many alternatives; None for none."""


@dataclass
class Chunk:
    """A piece of one choice's streamed generation."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    """One entry per generated token in this chunk (when requested)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token, None for the first (on the stream's first chunk only, when requested)."""
    load_adapter_s: float = 0.0
    """Seconds spent loading the adapter (on the stream's first chunk only)."""


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a tokenised prompt, its sampling, and the request's adapter (None: the base model)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    adapter: AdapterBlob | None = None


@dataclass(frozen=True)
class Readiness:
    """Whether a service can answer, and a word on it (for /health)."""

    ready: bool
    detail: str
