"""Defects a review found at the HTTP surface, and the conventions clients trip on (checked against vLLM's
server): each through the official `openai` client or raw HTTP against the FastAPI app in-process, on a
tiny random Llama (transformers engine), a real MiniLM index and the real trainer."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
import torch

from serving.app import create_app
from serving.logs import accept_request_id
from tests.conftest import tiny_local_server

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "How do I read rows from a CSV file?"}]
PLAIN = {"adaptation": {"enabled": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_index):
    return tiny_local_server(
        tmp_path_factory,
        small_index.directory,
        adaptation={"candidates": 20, "max_steps": 2, "max_train_tokens": 32, "learning_rate": 1e-3},
        generator={"max_model_len": 256, "default_max_tokens": 4},
    )


@pytest.fixture()
async def raw(server):
    transport = httpx.ASGITransport(app=create_app(server), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture()
async def client(server):
    transport = httpx.ASGITransport(app=create_app(server))
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="none", http_client=httpx.AsyncClient(transport=transport)
    ) as c:
        yield c


async def test_unmatched_paths_share_one_metrics_label(raw):
    for path in ("/anything-a-client-types", "/v1/secret-prompt-text", "/v1/chat/completions/x"):
        assert (await raw.get(path)).status_code == 404
    await raw.post("/v1/chat/completions", json={"model": MODEL})  # a matched route keeps its template
    metrics = (await raw.get("/metrics")).text
    assert "anything-a-client-types" not in metrics and "secret-prompt-text" not in metrics
    assert 'route="unmatched",status="404"' in metrics
    assert 'route="/v1/chat/completions",status="400"' in metrics


async def test_diverged_training_answers_with_the_base_model_and_valid_json(raw, server, monkeypatch):
    """A slot whose weights go non-finite: stop reason `diverged`, no adapter, no NaN anywhere (was a 500)."""
    bank = server.clients["trainer"].trainer.step.bank
    reset = bank.reset

    def reset_to_nan(slot: int, seed: int) -> None:
        reset(slot, seed)
        with torch.no_grad():
            bank.layers[0].lora_b[slot].fill_(float("nan"))

    monkeypatch.setattr(bank, "reset", reset_to_nan)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "adaptation": {"max_steps": 2, "min_gain": 0}}
    response = await raw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    report = response.json()["adaptation"]
    assert (report["stop_reason"], report["adapter"], report["steps"]) == ("diverged", False, 0)
    assert "diverged" in report["error"] and "NaN" not in response.text


async def test_min_tokens_above_max_tokens_is_a_400_before_any_work(raw, server, monkeypatch):
    async def no_selection(*args, **kwargs):
        raise AssertionError("selection ran for a request that was bound to fail")

    monkeypatch.setattr(server.clients["selector"], "select", no_selection)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "min_tokens": 5}
    response = await raw.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"


async def test_client_text_reaches_logs_escaped_and_bounded(raw, caplog):
    field = "evil\nINFO forged line" + "x" * 500
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **PLAIN, field: 1}
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        assert (await raw.post("/v1/chat/completions", json=body)).status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert "\n" not in line and len(line) < 200 and "evil\\nINFO" in line
    assert accept_request_id("abc\n") != "abc\n" and accept_request_id("abc-1") == "abc-1"


async def test_streamed_echo_logprobs_offsets_equal_the_whole_response(client):
    args = {"model": MODEL, "prompt": "def read_rows(path):", "max_tokens": 4, "echo": True, "logprobs": 1}
    args |= {"temperature": 0, "extra_body": PLAIN}
    stream = await client.completions.create(**args, stream=True)
    offsets = [
        o async for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    whole = await client.completions.create(**args)
    assert offsets == whole.choices[0].logprobs.text_offset and len(offsets) > 5


async def test_stream_options_unknown_keys_are_ignored_and_continuous_usage(client, raw, caplog):
    options = {"include_usage": True, "continuous_usage_stats": True, "include_obfuscation": False}
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, seed=0, stream=True, stream_options=options, extra_body=PLAIN
        )
        chunks = [c async for c in stream]
    assert any("stream_options.include_obfuscation" in r.getMessage() for r in caplog.records)
    with_tokens = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert with_tokens and all(c.usage is not None for c in with_tokens)
    assert [c.usage.completion_tokens for c in with_tokens] == sorted(c.usage.completion_tokens for c in with_tokens)
    final = chunks[-1]
    assert not final.choices and final.usage.completion_tokens == 3


async def test_replayed_tool_calls_are_rendered(client, raw, server):
    call = {"id": "call_1", "type": "function", "function": {"name": "read_csv", "arguments": '{"path": "a.csv"}'}}
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "name,age\nada,36"},
        {"role": "user", "content": "And now the second row?"},
    ]
    done = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=2, extra_body=PLAIN)
    assert done.choices[0].message.content is not None
    tokens = await raw.post("/tokenize", json={"model": MODEL, "messages": history})
    text = server.tokenizer.decode(tokens.json()["tokens"])
    assert "read_csv" in text and "ada,36" in text  # the model sees the call and its result
    refused = await raw.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
    )
    assert refused.status_code == 400 and "tools" in refused.json()["error"]["message"]


async def test_tokenize_and_detokenize_as_vllm(raw, server):
    prompt = await raw.post("/tokenize", json={"model": MODEL, "prompt": "import csv", "return_token_strs": True})
    body = prompt.json()
    assert prompt.status_code == 200 and body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == 256 and body["tokens"] == server.tokenizer("import csv").input_ids
    chat = (await raw.post("/tokenize", json={"messages": MESSAGES})).json()
    completion = await raw.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **PLAIN}
    )
    assert chat["count"] == completion.json()["usage"]["prompt_tokens"]  # what a chat request is billed
    back = await raw.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "import csv"}
    assert (await raw.post("/detokenize", json={"tokens": [10**9]})).status_code == 400
    assert (await raw.post("/tokenize", json={"model": "other", "prompt": "x"})).status_code == 404
    both = {"messages": MESSAGES, "add_generation_prompt": True, "continue_final_message": True}
    assert (await raw.post("/tokenize", json=both)).status_code == 400


async def test_the_report_counts_the_tokens_trained_on(client):
    extra = {"adaptation": {"max_steps": 2, "min_gain": 0}}
    done = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body=extra)
    report = done.model_extra["adaptation"]
    assert report["steps"] == 2 and 2 * 2 <= report["train_tokens"] <= 2 * 32


def test_engine_args_reach_vllm_and_unknown_names_are_refused(default_model_dir):
    from serving.config import GeneratorConfig
    from serving.engines.vllm_engine import engine_args

    config = GeneratorConfig(engine_args={"max_num_seqs": 8, "enable_prefix_caching": True, "enforce_eager": True})
    args = engine_args(default_model_dir, config, 16, "cpu", 512)
    assert (args.max_num_seqs, args.enable_prefix_caching, args.max_lora_rank, args.max_model_len) == (8, True, 16, 512)
    with pytest.raises(ValueError, match="'max_num_seq'"):
        engine_args(default_model_dir, GeneratorConfig(engine_args={"max_num_seq": 8}), 16, "cpu", 512)
    with pytest.raises(ValueError, match="generator.engine_args.max_lora_rank: follows trainer.rank"):
        GeneratorConfig(engine_args={"max_lora_rank": 64})


def test_vllm_flags_and_engine_args_are_checked_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["serve", "--max-num-seqs", "4", "--chat-template", "no-such-file"])
    assert result.exit_code == 1 and "chat_template" in result.output
    result = CliRunner().invoke(app, ["serve", "--dtype", "float32", "--gpu-memory-utilization", "2"])
    assert result.exit_code == 2 and "gpu_memory_utilization" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("generator:\n  engine_args: {max_num_seq: 4}\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--tensor-parallel-size", "1"])
    assert result.exit_code == 1 and "'max_num_seq'" in result.output


def test_the_chat_template_flag_is_used(tmp_path, server):
    from serving.prompts import load_chat_template

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert load_chat_template(str(template)) == template.read_text()
    server.prompts.chat_template = load_chat_template(str(template))
    try:
        from serving.protocol import ChatMessage

        ids = server.prompts.chat([ChatMessage(role="user", content="hi there")], add_generation_prompt=False)
        assert server.tokenizer.decode(ids).strip() == "[user] hi there"
    finally:
        server.prompts.chat_template = None
