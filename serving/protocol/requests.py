"""OpenAI's chat and completion requests (with vLLM's sampling extensions); each converts itself to
engine-neutral `Sampling`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.contracts import Sampling, SamplingDefaults
from serving.protocol.adaptation import (
    AdaptationOptions,
)
from serving.protocol.base import _LONG, Text, _Lenient


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

    def text(self) -> str:
        """The one prompt (a list of one was unpacked by validation)."""
        assert isinstance(self.prompt, str)
        return self.prompt

    def query(self) -> str:
        return self.text()

    def to_sampling(self, max_tokens: int, defaults: SamplingDefaults) -> Sampling:
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling(max_tokens, defaults, self.logprobs, prompt_logprobs)
