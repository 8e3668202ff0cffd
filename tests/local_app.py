"""The in-process application (no Ray) that `test_server_local` and `test_server_http` share: a tiny random
Llama (transformers engine), a real MiniLM index and the real trainer, behind the FastAPI app; the
official `openai` client (`client`) and plain HTTP (`raw`) against it, and checks that nothing leaked."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving.app import create_app
from serving.config import Settings
from serving.openai_server import local_server
from tests.conftest import live_adapters, tiny_llama_dir

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]


@pytest.fixture(scope="module")
def settings(tmp_path_factory, small_index) -> Settings:
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / MODEL)
    return Settings.model_validate(
        {
            "models": {"base_model": str(tiny)},
            "index_path": str(small_index.directory),
            "adaptation": {
                "candidates": 20,
                "max_steps": 2,
                "max_train_tokens": 32,
                "learning_rate": 1e-3,
                "context_tokens": 160,
            },
            "generator": {
                "engine": "transformers",
                "max_model_len": 256,
                "default_max_tokens": 8,
                "adapter_dir": str(tmp_path_factory.mktemp("adapters")),
            },
            "server": {"limits": {"max_steps": 8, "candidates": 50}},
        }
    )


@pytest.fixture(scope="module")
def server(settings):
    return local_server(settings)


@pytest.fixture()
def app(server):
    server.api_keys = []
    return create_app(server)


@pytest.fixture()
async def client(app):
    transport = httpx.ASGITransport(app=app)
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="none", http_client=httpx.AsyncClient(transport=transport)
    ) as c:
        yield c


@pytest.fixture()
async def raw(app):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # as a real server: log, answer 500
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def adapters_left(server) -> list:
    return list(server.settings.generator.adapter_dir.iterdir())


def gauge(server) -> float:
    return live_adapters(server)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
