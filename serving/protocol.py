"""OpenAI-compatible request and response models, and the `adaptation` extension (no serving logic here).

Requests follow vLLM's server where OpenAI is silent: unknown top-level fields are accepted and ignored
(the server logs their names), vLLM's sampling extensions pass through, and fields that would change the
answer but are not implemented (`tools`, a non-text `response_format`, `logit_bias`, `suffix`) are
refused. The `adaptation` object is strict: an unknown key there is an error. A conversation may replay
tool calls (assistant `tool_calls`, `tool` messages): they are rendered through the chat template, though
no tool parser runs here. Each request converts
itself to engine-neutral `Sampling`. Response and stream-chunk models sit beside the requests.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from selection.rules import Method
from selection.stopping import MIN_LAMBDA, StopReason
from serving.config import ContextMode
from serving.engines.base import Sampling, SamplingDefaults

_LONG = 2**63


def _no_lone_surrogates(text: str) -> str:
    """JSON may carry unpaired UTF-16 surrogates (\\ud800); they are not text, and tokenizers choke on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text contains an unpaired UTF-16 surrogate") from exc
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class _Lenient(BaseModel):
    """Top-level request objects: unknown fields are kept aside (`ignored_fields`) and not used."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---- the adaptation extension ----------------------------------------------------------------------


class AdaptationOptions(_Strict):
    """Per-request control of test-time training, sent as `extra_body={"adaptation": {...}}`.

    Every field falls back to the server's configuration; values above the server's limits are refused.
    """

    enabled: bool | None = None
    max_steps: int | None = Field(None, ge=0)
    min_gain: float | None = Field(
        None, ge=0, description="stop once a step removes less than this share of uncertainty per 1,000 tokens"
    )
    alpha: float | None = Field(None, gt=0, description="the paper's rule: stop once sigma_n > 1/(alpha n)")
    lambda_: float | None = Field(None, ge=MIN_LAMBDA, alias="lambda")
    candidates: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=1)
    max_train_tokens: int | None = Field(None, ge=2)
    time_budget_s: float | None = Field(None, gt=0)
    method: Method | None = None
    context: ContextMode | None = Field(
        None, description="prepend: the selected documents also go before the prompt (max_steps 0: only there)"
    )
    context_tokens: int | None = Field(None, ge=1, description="most prompt tokens the prepended documents add")
    progress: bool = Field(False, description="stream `selected` and per-step events before the first token")


class DocumentRef(BaseModel):
    id: str
    source: str


class StageTimings(BaseModel):
    """Seconds spent in each stage of the request."""

    queue: float = 0.0
    select: float = 0.0
    train: float = 0.0
    load_adapter: float = 0.0
    generate: float = 0.0


class AdaptationReport(BaseModel):
    """What test-time training did for this response (top-level `adaptation` object)."""

    enabled: bool = False
    documents: list[DocumentRef] = Field(default_factory=list)
    sigma2: list[float] = Field(default_factory=list)
    steps: int = 0
    train_tokens: int = Field(0, description="tokens trained on, summed over the steps (to bill and cap training)")
    stop_reason: StopReason = StopReason.DISABLED
    adapter: bool = False
    losses: list[float] = Field(default_factory=list)
    context: list[DocumentRef] = Field(
        default_factory=list, description="documents placed before the prompt (context: prepend), in order"
    )
    context_tokens: int = Field(0, description="prompt tokens the prepended documents added")
    timings: StageTimings = Field(default_factory=StageTimings)
    error: str | None = None


class SelectedEvent(BaseModel):
    """Progress event: the documents selection picked, before training starts."""

    stage: Literal["selected"] = "selected"
    documents: list[DocumentRef]
    sigma2: list[float]
    stop_reason: StopReason


class TrainingEvent(BaseModel):
    """Progress event: one training step is done."""

    stage: Literal["training"] = "training"
    step: int
    loss: float


ProgressEvent = Annotated[SelectedEvent | TrainingEvent, Field(discriminator="stage")]


# ---- requests --------------------------------------------------------------------------------------


class StreamOptions(_Lenient):
    """OpenAI's stream options and vLLM's `continuous_usage_stats`; unknown keys are ignored with a warning,
    as unknown top-level fields are."""

    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM extension: usage on every chunk (with include_usage)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: Text
    arguments: Text = Field(description="the call's arguments as the model wrote them (JSON text)")


class ToolCall(BaseModel):
    """A tool call an assistant made earlier in the conversation (replayed history; no tool runs here)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier tool calls")
    tool_call_id: Text | None = Field(None, description="the call a `tool` message answers")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _SamplingRequest(_Lenient):
    """Fields shared by chat and completion requests: OpenAI's sampling fields and vLLM's extensions."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; 0 or -1 switch it off")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM extension")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="vLLM extension")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    min_tokens: int = Field(0, ge=0, description="vLLM extension")
    ignore_eos: bool = Field(False, description="vLLM extension")
    skip_special_tokens: bool = Field(True, description="vLLM extension")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-_LONG, lt=_LONG)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    adaptation: AdaptationOptions | None = None

    @property
    def ignored_fields(self) -> list[str]:
        unknown = (
            [f"stream_options.{key}" for key in (self.stream_options.model_extra or {})] if self.stream_options else []
        )
        return sorted([*super().ignored_fields, *unknown])

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> None:
        if bias:
            raise ValueError("logit_bias is not supported by this server")
        return None

    def _sampling(
        self, max_tokens: int, defaults: SamplingDefaults, logprobs: int | None, prompt_logprobs: int | None
    ) -> Sampling:
        def pick(value, default):
            return default if value is None else value

        return Sampling(
            max_tokens=max_tokens,
            n=self.n,
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=max(0, pick(self.top_k, defaults.top_k)),
            min_p=pick(self.min_p, defaults.min_p),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: Any = None
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list | None) -> None:
        if tools:
            raise ValueError("tools (function calling) are not supported by this server")
        return None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict | None) -> dict | None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValueError(f"response_format type {fmt.get('type')!r} is not supported; only 'text' is")
        return fmt

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a user message with text")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def query(self) -> str:
        """The text selection looks for: the last user message with text."""
        return next(m.text() for m in reversed(self.messages) if m.role == "user" and m.text().strip())

    def to_sampling(self, max_tokens: int, defaults: SamplingDefaults) -> Sampling:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, defaults, logprobs, None)


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] = Field(description="one prompt (a list of exactly one is accepted)")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, description="not supported: must be empty")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return None

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo=true (scoring the prompt)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def query(self) -> str:
        return self.prompt  # type: ignore[return-value]  (one string after validation)

    def to_sampling(self, max_tokens: int, defaults: SamplingDefaults) -> Sampling:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling(max_tokens, defaults, self.logprobs, prompt_logprobs)


# ---- responses -------------------------------------------------------------------------------------


def new_id(prefix: str, request_id: str | None = None) -> str:
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    adaptation: AdaptationReport


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None
    adaptation: AdaptationReport | ProgressEvent | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    adaptation: AdaptationReport


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None
    adaptation: AdaptationReport | ProgressEvent | None = None


# ---- tokenizer routes (vLLM's /tokenize and /detokenize) -------------------------------------------


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (e.g. BOS)")
    return_token_strs: bool = Field(False, description="also return each token as text")


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="end with the assistant's turn opening, as a chat request")
    continue_final_message: bool = Field(False, description="leave the last message open (no end-of-turn)")
    add_special_tokens: bool = Field(False, description="special tokens on top of what the chat template adds")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("set at most one of add_generation_prompt and continue_final_message")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, lt=_LONG)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sift-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    parts: dict[str, str] = Field(default_factory=dict, description="each deployment: 'ready' or why not")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
