"""`benchmarks/gpu_check.sh` in its CPU dry run (every step but the CUDA parts), and how its summary judges."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from benchmarks.gpu_summary import Status, read_steps, summarise

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["resolve", "setup", "model", "tests", "trainer_speed", "selection_speed", "latency", "merge_latency"]


def gpu_pins() -> dict[str, str]:
    """The `==` pins of the gpu extra in pyproject.toml, by package name."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return {re.split(r"[\[=]", req)[0]: req.split("==")[1] for req in extra}


def write_steps(out: Path, rows: list[tuple[str, int]]) -> None:
    (out / "steps.tsv").write_text("".join(f"{name}\t{rc}\t1500\t\n" for name, rc in rows))


def test_exit_statuses_become_outcomes(tmp_path):
    write_steps(tmp_path, [("a", 0), ("b", 75), ("c", 124), ("d", 137), ("e", 1)])
    statuses = [s.status for s in read_steps(tmp_path / "steps.tsv")]
    assert statuses == [Status.OK, Status.SKIPPED, Status.TIMEOUT, Status.TIMEOUT, Status.FAILED]
    summary = summarise(tmp_path, "offline", 540)
    assert summary["problems"] == ["c: timeout", "d: timeout", "e: failed"]
    assert summary["total_s"] == pytest.approx(7.5)


def test_a_skipped_gpu_test_is_a_problem_on_a_gpu_machine_only(tmp_path):
    write_steps(tmp_path, [("tests", 0)])
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><skipped message="needs vLLM"/></testcase>'
        '<testcase name="c"><failure message="x"/></testcase></testsuite></testsuites>'
    )
    gpu = summarise(tmp_path, "gpu", 540)
    assert gpu["tests"] == {"passed": 1, "failed": 1, "skipped": 1, "skip_reasons": ["b: needs vLLM"]}
    assert gpu["problems"] == ["tests: 1 skipped on the GPU machine"]
    assert summarise(tmp_path, "offline", 540)["problems"] == []


@pytest.mark.slow
def test_the_dry_run_passes_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400
    )
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-6000:]
    assert "all steps passed" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert {s["status"] for s in summary["steps"]} == {"ok"}
    assert summary["tests"] == {"passed": 5, "failed": 0, "skipped": 0, "skip_reasons": []}
    pins = gpu_pins()
    assert {name: summary["resolve"][name] for name in ("vllm", "faiss-gpu", "ray")} == pins
    assert summary["resolve"]["torch"] is not None
    assert summary["trainer_speed"]["batches"].keys() == {"1", "2"}
    assert summary["latency"]["protocol_request"]["steps"] == 2
    assert summary["merge_latency"]["e2e_p50"].keys() == {"plain", "merge"}
    for name in ("trainer_speed", "selection_speed", "latency", "merge_latency", "resolve", "summary"):
        assert (tmp_path / f"{name}.json").is_file()
