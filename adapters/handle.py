"""Adapter directories and their lifecycle: unique per request, on tmpfs, deleted on release.

Every adapter lives in `<root>/<pid>-<uuid>/`. The `AdapterHandle` owns it and deletes it on
`release()` (idempotent; also as a context manager). Directories of processes that died without
releasing are removed by `cleanup_stale` at start-up, and a process removes what it still owns at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d+)-[0-9a-f]{32}$")
_owned: set[Path] = set()


def adapter_root(configured: Path | None = None) -> Path:
    """The directory adapters go to: the configured one, else tmpfs (/dev/shm) when writable, else /tmp."""
    if configured is not None:
        root = Path(configured)
    elif os.access("/dev/shm", os.W_OK):
        root = Path("/dev/shm") / "sift-serve-adapters"
    else:
        root = Path(tempfile.gettempdir()) / "sift-serve-adapters"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(root: Path) -> int:
    """Delete adapter directories left behind by processes that no longer exist; returns how many."""
    removed = 0
    for entry in Path(root).iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d stale adapter directories from %s", removed, root)
    return removed


def new_adapter_dir(root: Path) -> Path:
    """A fresh, uniquely named directory for one adapter, owned by this process until released."""
    path = Path(root) / f"{os.getpid()}-{uuid.uuid4().hex}"
    path.mkdir()
    _owned.add(path)
    return path


def remove_adapter_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _owned.discard(Path(path))


@atexit.register
def _remove_owned() -> None:
    for path in list(_owned):
        remove_adapter_dir(path)


@dataclass
class AdapterHandle:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and its unique name."""

    name: str
    path: Path
    released: bool = False

    def release(self) -> None:
        """Delete the directory (safe to call twice, from any process on this machine)."""
        if not self.released:
            remove_adapter_dir(self.path)
            self.released = True

    def __enter__(self) -> AdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
