"""Adapters in transit and on disk: `AdapterBlob` (a PEFT adapter as bytes, what the Trainer hands over,
through Ray's object store when Trainer and Generator are on different nodes) and `AdapterHandle` (the
same adapter written to a directory on the node that loads it, deleted on release).

Directories are `<root>/<host>__<pid>__<uuid>/` on tmpfs by default. The host in the name means a root on
a shared volume is safe: `cleanup_stale` removes only directories of this host whose process is gone, and a
process removes what it still owns at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_NAME = re.compile(r"^(?P<host>[A-Za-z0-9.-]+)__(?P<pid>\d+)__[0-9a-f]{32}$")
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


def _host() -> str:
    """This host's name as it appears in directory names (characters a hostname may hold)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(root: Path) -> int:
    """Delete this host's adapter directories whose process no longer exists; returns how many."""
    removed, host = 0, _host()
    for entry in Path(root).iterdir():
        match = _NAME.match(entry.name)
        if match and match["host"] == host and entry.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d stale adapter directories from %s", removed, root)
    return removed


def new_adapter_dir(root: Path) -> Path:
    """A fresh, uniquely named directory for one adapter, owned by this process until released."""
    path = Path(root) / f"{_host()}__{os.getpid()}__{uuid.uuid4().hex}"
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


def lora_scaling(config: dict) -> float:
    """A PEFT LoRA's s = lora_alpha / r, from its adapter_config.json."""
    return float(config["lora_alpha"]) / float(config["r"])


@dataclass
class AdapterHandle:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and its unique name."""

    name: str
    path: Path
    released: bool = False

    def release(self) -> None:
        """Delete the directory (safe to call twice)."""
        if not self.released:
            remove_adapter_dir(self.path)
            self.released = True

    def __enter__(self) -> AdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class AdapterBlob:
    """A PEFT adapter as bytes: what `adapter_config.json` and `adapter_model.safetensors` would hold."""

    config_json: str
    weights: bytes

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], config_json: str) -> AdapterBlob:
        return cls(config_json=config_json, weights=save(tensors, metadata={"format": "pt"}))

    def tensors(self) -> dict[str, torch.Tensor]:
        return load(self.weights)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r: the delta is s B A."""
        return lora_scaling(json.loads(self.config_json))

    def write(self, root: Path) -> AdapterHandle:
        """The adapter as a PEFT directory under `root` on this node; the handle owns (and deletes) it."""
        path = new_adapter_dir(root)
        try:
            (path / WEIGHTS_FILE).write_bytes(self.weights)
            (path / CONFIG_FILE).write_text(self.config_json)
        except BaseException:
            remove_adapter_dir(path)
            raise
        return AdapterHandle(name=path.name, path=path)
