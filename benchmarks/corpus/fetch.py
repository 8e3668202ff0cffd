"""Fetching pinned packages (PyPI wheels/sdists, Debian .debs) into a cache, verified by sha256."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A pinned package could not be fetched or does not match its pin."""


@dataclass(frozen=True)
class Pin:
    """One package at one version, with the sha256 of the file the registry serves."""

    kind: str  # "wheel", "sdist" or "deb"
    name: str
    version: str
    sha256: str

    @property
    def filename_prefix(self) -> str:
        if self.kind == "deb":
            return f"{self.name}_{self.version}_"
        return f"{self.name.replace('-', '_')}-{self.version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(pin: Pin, directory: Path) -> None:
    if pin.kind == "deb":
        command = ["apt-get", "download", f"{pin.name}={pin.version}"]
        hint = "run `apt-get update` once; Debian may have replaced this version (update the pin)"
    else:
        binary = ["--only-binary", ":all:"] if pin.kind == "wheel" else ["--no-binary", ":all:"]
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            *binary,
            "-d",
            str(directory),
            f"{pin.name}=={pin.version}",
        ]
        hint = "is PyPI reachable?"
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(f"could not fetch {pin.name} {pin.version} ({hint}): {done.stderr.strip()[-400:]}")


def fetch(pin: Pin, cache: Path) -> Path:
    """The package file for `pin`, downloaded into `cache` unless already there; sha256-checked."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in cache.iterdir() if p.name.lower().startswith(pin.filename_prefix.lower()))
    if not found:
        log.info("fetching %s %s", pin.name, pin.version)
        _download(pin, cache)
        found = sorted(p for p in cache.iterdir() if p.name.lower().startswith(pin.filename_prefix.lower()))
    if not found:
        raise FetchError(f"{pin.name} {pin.version}: downloaded, but no file named {pin.filename_prefix}* appeared")
    path = found[0]
    actual = _sha256(path)
    if actual != pin.sha256:
        raise FetchError(f"{path.name}: sha256 {actual} does not match the pin {pin.sha256}")
    return path


def read_members(path: Path, suffixes: tuple[str, ...], under: str = "") -> dict[str, bytes]:
    """Files inside a wheel, sdist or .deb whose names start with `under` and end with one of `suffixes`."""
    out: dict[str, bytes] = {}
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.startswith(under) and name.endswith(suffixes):
                    out[name] = z.read(name)
        return out
    if path.suffix == ".deb":
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, check=True).stdout
        import io

        tar = tarfile.open(fileobj=io.BytesIO(data))
    else:
        tar = tarfile.open(path)
    with tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith(under) and name.endswith(suffixes):
                out[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return out
