"""vLLM's /tokenize and /detokenize bodies."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from serving.protocol.base import _LONG, Text, _Strict
from serving.protocol.requests import (
    ChatMessage,
)


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
