"""The one configuration model: shared by the CLI, YAML config files and the tests."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from adapters.config import TrainerConfig
from selection.config import IndexConfig, ModelsConfig, SelectionConfig, Strict


class Settings(Strict):
    """Everything sift-serve can be configured with; each package reads its own section."""

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        """Defaults, overlaid with a YAML file when given (unknown keys are errors)."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
        return cls.model_validate(data)
