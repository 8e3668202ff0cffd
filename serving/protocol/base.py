"""Shared pieces of the wire models: strict and lenient bases, text that must be valid UTF-8, ids and
timestamps."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

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


def new_id(prefix: str, request_id: str | None = None) -> str:
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
