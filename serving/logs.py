"""The request id in every log line: a context variable set by the Ingress for each request, copied onto
every log record (as `%(request_id)s`) by a record factory, so any handler (ours, Ray's, pytest's) sees it."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("sift_serve_request_id", default="-")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def accept_request_id(header: str | None) -> str:
    """The client's X-Request-Id when it is a plain token (no spaces or control characters, at most 128
    characters, so it cannot forge log lines), else a new one."""
    if header and _SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def loggable(text: str, limit: int = 64) -> str:
    """Client-supplied text made safe for a log line: control and non-ASCII characters escaped (no forged
    lines), at most `limit` characters."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def loggable_names(names: list[str], most: int = 10) -> str:
    """A client's list of names (e.g. unknown fields) for one log line: each `loggable`, at most `most`."""
    shown = ", ".join(loggable(name) for name in names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


_installed = False


def install() -> None:
    """Give every log record made from now on a `request_id` attribute (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def with_request_id(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    logging.setLogRecordFactory(with_request_id)
    _installed = True


def configure(level: int) -> None:
    """Root logging with the request id in each line (for the CLI and local runs)."""
    install()
    logging.basicConfig(level=level, format=LOG_FORMAT)
