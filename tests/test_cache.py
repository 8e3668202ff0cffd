"""The adapter cache: identical training inputs share one adapter (whoever asks, whatever the prompt), other
inputs never do, only complete runs are kept, the byte budget evicts the least recently used; and through
the `openai` client, a repeated request is answered without training (`adaptation.cached`), counted in
the metrics."""

from __future__ import annotations

import dataclasses

import pytest

from adapters.cache import AdapterCache, cacheable, key
from adapters.config import TrainerConfig
from adapters.handle import AdapterBlob
from adapters.spec import TrainResult
from selection.stopping import StopReason
from serving.openai_server import local_server
from tests.conftest import in_process_client, tiny_app_settings, tiny_llama_dir, train_request

CONFIG = TrainerConfig()
DOCS = ("first document", "second document", "third document")


def result(size: int = 100, reason: StopReason = StopReason.MAX_STEPS, steps: int = 3) -> TrainResult:
    blob = AdapterBlob(config_json="{}", weights=bytes(size))
    return TrainResult(blob, steps, reason, losses=(1.0,) * steps, train_seconds=2.0)


def test_the_key_covers_every_input_that_changes_the_weights():
    base = key(train_request(DOCS), CONFIG, "m")
    assert base == key(train_request(DOCS, request_id="another caller"), CONFIG, "m")
    assert base == key(train_request([*DOCS, "past the step cap"], max_steps=3), CONFIG, "m")  # never trained on
    variants = [
        key(train_request(DOCS[::-1]), CONFIG, "m"),
        key(train_request(DOCS, learning_rate=0.5), CONFIG, "m"),
        key(train_request(DOCS, seed=1), CONFIG, "m"),
        key(train_request(DOCS, max_train_tokens=8), CONFIG, "m"),
        key(train_request(DOCS), CONFIG.model_copy(update={"rank": 16}), "m"),
        key(train_request(DOCS), CONFIG, "another model"),
        key(dataclasses.replace(train_request(DOCS), initial=AdapterBlob("{}", b"x")), CONFIG, "m"),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert base == key(train_request(DOCS), CONFIG.model_copy(update={"max_batch": 8, "cache_bytes": 1}), "m")


def test_only_complete_runs_are_kept():
    request = train_request(DOCS, documents_end=StopReason.GAIN_BUDGET)
    assert cacheable(request, result(reason=StopReason.GAIN_BUDGET))
    assert cacheable(request, result(reason=StopReason.MAX_STEPS))
    for cut_short in (StopReason.TIME_BUDGET, StopReason.CANCELLED, StopReason.DIVERGED):
        assert not cacheable(request, result(reason=cut_short))
    assert not cacheable(request, dataclasses.replace(result(), adapter=None))


def test_a_hit_reports_the_new_requests_end_and_no_training_time():
    cache = AdapterCache(1000)
    cache.put("k", result(reason=StopReason.GAIN_BUDGET))
    hit = cache.get(train_request(DOCS, documents_end=StopReason.MIN_GAIN), "k")
    assert hit.cached and hit.stop_reason is StopReason.MIN_GAIN and hit.train_seconds == 0 and hit.steps == 3
    assert cache.get(train_request(DOCS), "other") is None


def test_the_byte_budget_evicts_the_least_recently_used():
    cache = AdapterCache(250)
    cache.put("a", result(100))
    cache.put("b", result(100))
    assert cache.get(train_request(DOCS), "a") is not None  # a is now the most recent
    cache.put("c", result(100))
    assert (cache.get(train_request(DOCS), "b"), len(cache), cache.bytes) == (None, 2, 200)
    cache.put("huge", result(300))
    assert cache.get(train_request(DOCS), "huge") is None and len(cache) == 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_index):
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    settings = tiny_app_settings(
        tiny,
        small_index.directory,
        adaptation={"candidates": 20, "max_steps": 2, "max_train_tokens": 32},
        trainer={"cache_bytes": 2**28},  # on, as by default (the suite turns it off: tests/conftest.py)
        generator={"max_model_len": 256, "default_max_tokens": 4, "adapter_dir": str(tmp_path_factory.mktemp("a"))},
    )
    return local_server(settings)


async def test_a_repeated_request_skips_training(server):
    messages = [{"role": "user", "content": "How do I sort a list with a heap?"}]
    extra = {"adaptation": {"gain_budget": None}}
    async with in_process_client(server) as client:
        first = await client.chat.completions.create(model="tiny-llama", messages=messages, extra_body=extra)
        again = await client.chat.completions.create(model="tiny-llama", messages=messages, extra_body=extra)
        metrics = (await client._client.get("http://test/metrics")).text
    one, two = first.model_extra["adaptation"], again.model_extra["adaptation"]
    assert (one["cached"], two["cached"]) == (False, True)
    assert two["steps"] == one["steps"] == 2 and two["losses"] == one["losses"] and two["adapter"]
    assert two["timings"]["train"] == 0 and one["timings"]["train"] > 0
    assert scrape_text(metrics, 'sift_adapter_cache_total{result="hit"}') == 1.0
    assert scrape_text(metrics, 'sift_adapter_cache_total{result="miss"}') == 1.0


def scrape_text(exposition: str, series: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None
