"""The soak's short version in CI: 90 s of mixed locust load (4 users) on the real default model and vLLM
under Ray Serve, then nothing lost, leaked or restarted, and memory flat (`benchmarks/soak.py`)."""

from __future__ import annotations

import pytest

from benchmarks.soak import soak
from serving.config import Settings

pytestmark = pytest.mark.slow


def test_short_soak_loses_and_leaks_nothing(small_index, tmp_path):
    settings = Settings.model_validate(
        {
            "index_path": str(small_index.directory),
            "adaptation": {"candidates": 30},
            "generator": {"max_model_len": 1024, "adapter_dir": str(tmp_path / "adapters")},
        }
    )
    report = soak(settings, users=4, duration_s=90, warm_up_s=30)
    shown = {k: v for k, v in report.items() if k != "by_kind"}
    assert report["requests"] >= 50, shown
    assert all(report["checks"].values()), shown
