"""Hostile input: the HTTP API fuzzed from its own OpenAPI schema (schemathesis), plus hand-written abuse.

Every answer must be a 2xx or a 4xx in OpenAI's error shape, never a 5xx; no error message may carry a
stack trace, a path of the server's files or another request's data; and the server must answer a normal
request afterwards. Runs in-process on a tiny random Llama (transformers engine) with the real trainer,
selector and MiniLM index, so a bounded number of examples per route fits in CI.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from serving.app import create_app
from tests.conftest import tiny_local_server

MODEL = "tiny-llama"
SECRET = "zebra-quartz-7731"  # a marker that must never leak from one request into another's error
# What an error message must never contain: a traceback, this server's files, the virtualenv, home paths.
LEAKS = re.compile(r"Traceback|File \"|site-packages|\.py\b|" + re.escape(os.getcwd()) + r"|/root/|/home/")
EXAMPLES = int(os.environ.get("SIFT_SERVE_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, small_index):
    server = tiny_local_server(
        tmp_path_factory,
        small_index.directory,
        adaptation={"candidates": 20, "max_steps": 1, "max_train_tokens": 32},
        generator={"max_model_len": 256, "default_max_tokens": 4},
        server={"limits": {"max_steps": 2, "candidates": 50, "n": 2}},
    )
    return create_app(server)


def assert_clean(response) -> None:
    """2xx, or 4xx with OpenAI's error shape and a message that leaks nothing."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert not LEAKS.search(error["message"]), error["message"]
        assert SECRET not in error["message"]


@pytest.fixture(scope="module")
def operations(app) -> dict[str, schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    found = [result.ok() for result in schema.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op for op in found}


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
CASES = [
    (route, mode) for route in ("POST /v1/chat/completions", "POST /v1/completions") for mode in (POSITIVE, NEGATIVE)
]
CASES += [("GET /v1/models", POSITIVE), ("GET /health", POSITIVE)]  # no parameters: nothing to violate


@pytest.mark.parametrize("route,mode", CASES)
def test_fuzzed_requests_get_2xx_or_clean_4xx(operations, route, mode):
    """Examples generated from the route's schema, conforming (positive) and violating it (negative)."""

    @given(case=operations[route].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: schemathesis.Case) -> None:
        assert_clean(case.call(timeout=120))

    check()


@pytest.fixture()
async def raw(app):
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        yield c


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "How do I read a CSV file?"}], **extra}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE = {
    "huge body": json.dumps(chat(user="x" * (5 * 2**20))).encode(),
    "deeply nested JSON": ('{"model": "tiny-llama", "messages": ' + nested(100_000) + "}").encode(),
    "nested under an unknown field": ('{"model": "tiny-llama", "messages": [], "x": ' + nested(50_000) + "}").encode(),
    "invalid UTF-8": b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe\xc3\x28"}]}',
    "not JSON": b"model=tiny-llama&messages=hello",
    "JSON but not an object": b'["model", "tiny-llama"]',
    "empty body": b"",
    "negative max_tokens": json.dumps(chat(max_tokens=-1)).encode(),
    "huge max_tokens": json.dumps(chat(max_tokens=10**15)).encode(),
    "huge n": json.dumps(chat(n=10**9)).encode(),
    "NaN temperature": b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "steps out of range": json.dumps(chat(adaptation={"max_steps": 10**9})).encode(),
    "negative lambda": json.dumps(chat(adaptation={"lambda": -1})).encode(),
    "zero candidates": json.dumps(chat(adaptation={"candidates": 0})).encode(),
    "huge learning rate": json.dumps(chat(adaptation={"learning_rate": 1e308})).encode(),
    "unknown method": json.dumps(chat(adaptation={"method": "../../etc/passwd"})).encode(),
    "adaptation not an object": json.dumps(chat(adaptation="rm -rf /")).encode(),
    "seed out of range": json.dumps(chat(seed=2**70)).encode(),
    "huge stop list": json.dumps(chat(stop=["x"] * 100_000)).encode(),
    "messages not a list": json.dumps({"model": MODEL, "messages": {"role": "user"}}).encode(),
    "role not allowed": json.dumps({"model": MODEL, "messages": [{"role": "root", "content": "x"}]}).encode(),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hand_written_abuse_is_refused_cleanly(raw, name):
    response = await raw.post(
        "/v1/chat/completions", content=HOSTILE[name], headers={"content-type": "application/json"}
    )
    assert_clean(response)
    if name not in ("huge body",):
        assert response.status_code in (200, 400), (name, response.status_code)


PATHS = ["/etc/passwd", "../../../../etc/shadow", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/"]


@pytest.mark.parametrize("value", PATHS)
async def test_paths_and_urls_in_every_string_field_reach_no_file(raw, app, value):
    """Strings are text to the server: a model name, a stop word, a user id that is a path opens nothing."""
    adapters = app.state.server.settings.generator.adapter_dir
    for body in (
        {"model": value, "messages": [{"role": "user", "content": "hi"}]},
        chat(messages=[{"role": "system", "content": value}, {"role": "user", "content": value}]),
        chat(user=value, stop=[value], max_tokens=2),
        {"model": MODEL, "prompt": value, "max_tokens": 2},
    ):
        route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        response = await raw.post(route, json=body, headers={"X-Request-Id": value})
        assert_clean(response)
        assert "root:" not in response.text  # /etc/passwd's first field
        assert response.headers["x-request-id"] != value  # not a plain token: replaced by a fresh id
    assert list(adapters.iterdir()) == []  # and every adapter directory is gone again


async def test_errors_do_not_carry_another_requests_data_and_the_server_stays_up(raw):
    ok = await raw.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": SECRET}]))
    assert ok.status_code == 200
    for body in HOSTILE.values():
        assert_clean(await raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))
    after = await raw.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] is not None
