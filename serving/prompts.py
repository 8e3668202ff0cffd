"""A request's prompt as token ids: chat through the chat template, completions as they are, either with
documents placed before the prompt (in-context retrieval).

`PromptRenderer` is what the OpenAI server and the pipeline's in-context step call (off the event loop:
templates and tokenizers are CPU work); `load_chat_template` reads `generator.chat_template` the way
vLLM's --chat-template does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from serving.context import PREAMBLE, as_text, completion_ids
from serving.errors import bad_request
from serving.protocol import ChatMessage


class PromptRenderer:
    """The model's tokenizer and chat template, rendering requests to prompt ids."""

    def __init__(self, tokenizer, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @property
    def _template_knows_tool_calls(self) -> bool:
        return "tool_calls" in (self.chat_template or self.tokenizer.chat_template or "")

    def chat(
        self,
        messages: Sequence[ChatMessage],
        documents: Sequence[str] = (),
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The conversation as prompt ids through the chat template, with `documents` (if any) as a leading
        system message. Replayed tool calls reach the template as `tool_calls` where it reads them, else as
        JSON text in the assistant's content, so the model sees them either way."""
        rendered = [template_message(m, self._template_knows_tool_calls) for m in messages]
        if documents:
            rendered.insert(0, {"role": "system", "content": PREAMBLE + "\n\n" + as_text(documents).strip()})
        try:
            ids = self.tokenizer.apply_chat_template(
                rendered,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
            )
        except (ValueError, TemplateError) as exc:  # the template refused these messages: the client's to fix
            message = f"The chat template cannot render these messages ({type(exc).__name__})."
            raise bad_request(message, "messages") from exc
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def completion(self, prompt: str, documents: Sequence[str] = ()) -> list[int]:
        """A completion prompt's ids, with `documents` (if any) as text before it."""
        return completion_ids(self.tokenizer, prompt, documents)


def load_chat_template(template: str | None) -> str | None:
    """The configured chat template: the Jinja template itself, or the path of a file holding one (as vLLM's
    --chat-template); None keeps the tokenizer's own."""
    if template is None or "{{" in template or "{%" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise FileNotFoundError(f"generator.chat_template is neither a Jinja template nor a file: {template}")
    return path.read_text()


def template_message(message: ChatMessage, knows_tool_calls: bool) -> dict[str, Any]:
    """One message as chat templates take it (`developer` is `system` to them)."""
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        calls = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        if knows_tool_calls:
            out["tool_calls"] = calls
        else:
            out["content"] = "\n".join(part for part in (out["content"], json.dumps(calls)) if part)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out
