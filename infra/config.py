"""The strict base of every configuration section, and where sift-serve keeps what it builds."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


def default_cache_dir() -> Path:
    """Where converted models and the default index live: $SIFT_SERVE_CACHE, else the user's cache dir."""
    if os.environ.get("SIFT_SERVE_CACHE"):
        return Path(os.environ["SIFT_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sift-serve"


def resolve_device(device: str) -> str:
    """A torch device name; 'auto' is CUDA when this process sees a GPU, else the CPU (one config file then
    serves a cluster whose deployments land on GPU and CPU nodes)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment, and
    infinities or NaNs are refused (a NaN learning rate or lambda is never what an operator meant)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False)
