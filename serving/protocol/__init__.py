"""OpenAI-compatible request and response models, and the `adaptation` extension (no serving logic here).

Requests follow vLLM's server where OpenAI is silent: unknown top-level fields are accepted and ignored
(the server logs their names), vLLM's sampling extensions pass through, and fields that would change the
answer but are not implemented (`tools`, a non-text `response_format`, `logit_bias`, `suffix`) are
refused. The `adaptation` object is strict: an unknown key there is an error. A conversation may replay
tool calls (assistant `tool_calls`, `tool` messages): they are rendered through the chat template, though
no tool parser runs here. Each request converts itself to engine-neutral `Sampling`.

One module per part of the wire: `requests`, `responses` (and stream chunks), `adaptation` (the extension),
`tokenize` (vLLM's tokenizer routes), `base` (shared bases); everything is importable from here.
"""

from __future__ import annotations

from serving.protocol.adaptation import (
    AdaptationOptions,
    AdaptationReport,
    DocumentRef,
    ExpertRef,
    MergedEvent,
    MergeReport,
    PickedRef,
    ProgressEvent,
    SelectedEvent,
    SessionDeleted,
    SessionReport,
    StageTimings,
    TrainingEvent,
)
from serving.protocol.base import Text, new_id, now
from serving.protocol.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FunctionCall,
    StreamOptions,
    TextPart,
    ToolCall,
)
from serving.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    ErrorBody,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
)
from serving.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

__all__ = [
    "AdaptationOptions",
    "AdaptationReport",
    "ExpertRef",
    "MergedEvent",
    "MergeReport",
    "SessionDeleted",
    "SessionReport",
    "PickedRef",
    "AssistantMessage",
    "ChatChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatLogprobs",
    "ChatMessage",
    "ChatStreamChoice",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DeltaMessage",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "DocumentRef",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "HealthResponse",
    "ModelCard",
    "ModelList",
    "ProgressEvent",
    "SelectedEvent",
    "StageTimings",
    "StreamOptions",
    "Text",
    "TextPart",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
    "ToolCall",
    "TopLogprob",
    "TrainingEvent",
    "UsageInfo",
    "new_id",
    "now",
]
