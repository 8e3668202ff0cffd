"""OpenAI-compatible request and response models, plus the `ttft` extension (no serving logic here).

Requests are strict: unknown top-level fields and unknown `ttft` keys are 400s rather than silently
ignored, so a client always knows what the server did with what it sent.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHOD = Literal["sift", "nn", "nn_f", "uncertainty", "random"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TTFTOptions(_Strict):
    """Per-request control of test-time fine-tuning, sent as `extra_body={"ttft": {...}}`."""

    enabled: bool | None = None
    max_steps: int | None = Field(None, ge=0, le=1000)
    alpha: float | None = Field(None, gt=0)
    lambda_: float | None = Field(None, gt=0, alias="lambda")
    candidates: int | None = Field(None, ge=1, le=10000)
    learning_rate: float | None = Field(None, gt=0, le=1)
    max_train_tokens: int | None = Field(None, ge=2, le=32768)
    time_budget_s: float | None = Field(None, gt=0, le=3600)
    method: METHOD | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _SamplingFields(_Strict):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    ttft: TTFTOptions | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: each choice would need its own adapter")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _has_user_text(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a user message with text")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo=true (scoring the prompt)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------------------


class DocumentRef(BaseModel):
    id: str
    source: str


class TTFTTimings(BaseModel):
    queue: float = 0.0
    select: float = 0.0
    train: float = 0.0
    load_adapter: float = 0.0
    generate: float = 0.0


class TTFTReport(BaseModel):
    """What test-time training did for this response."""

    enabled: bool
    documents: list[DocumentRef] = Field(default_factory=list)
    sigma2: list[float] = Field(default_factory=list)
    steps: int = 0
    stop_reason: str = "disabled"
    adapter: bool = False
    losses: list[float] = Field(default_factory=list)
    timings: TTFTTimings = Field(default_factory=TTFTTimings)
    error: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "sift-serve"}
