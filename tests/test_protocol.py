"""The request models on their own: defaults from the model's generation_config.json, conversion to
engine-neutral sampling settings, and the fields that are refused or ignored."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serving.engines import SamplingDefaults
from serving.protocol import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_sampling_defaults_come_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "eos_token_id": 2})
    )
    defaults = SamplingDefaults.from_model(tmp_path)
    assert defaults == SamplingDefaults(temperature=0.3, top_p=0.9, top_k=20, repetition_penalty=1.1)
    unset = ChatCompletionRequest(model="m", messages=MESSAGES).to_sampling(8, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.3, 0.9, 20, 1.1)
    chosen = ChatCompletionRequest(model="m", messages=MESSAGES, temperature=0, top_k=-1).to_sampling(8, defaults)
    assert (chosen.temperature, chosen.top_k) == (0, 0)  # what the request says wins; -1 means off
    assert SamplingDefaults.from_model(tmp_path / "nowhere") == SamplingDefaults()


def test_vllm_extensions_and_logprobs_reach_sampling():
    req = CompletionRequest(
        model="m", prompt=["only one"], echo=True, logprobs=3, min_tokens=2, ignore_eos=True, stop="x", n=2
    )
    s = req.to_sampling(16, SamplingDefaults())
    assert (s.min_tokens, s.ignore_eos, s.stop, s.n, s.logprobs, s.prompt_logprobs) == (2, True, ("x",), 2, 3, 3)
    chat = ChatCompletionRequest(model="m", messages=MESSAGES, logprobs=True, top_logprobs=4).to_sampling(
        8, SamplingDefaults()
    )
    assert (chat.logprobs, chat.prompt_logprobs) == (4, None)


def test_unknown_fields_are_kept_aside_but_the_adaptation_object_is_strict():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "store": True, "metadata": {}})
    assert req.ignored_fields == ["metadata", "store"]
    with pytest.raises(ValidationError, match="adaptation.bogus"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "adaptation": {"bogus": 1}})


@pytest.mark.parametrize(
    "extra",
    [{"tools": [{"type": "function"}]}, {"response_format": {"type": "json_schema"}}, {"logit_bias": {"1": 2}}],
)
def test_fields_that_would_change_the_answer_are_refused(extra):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **extra})
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": []}).tools is None


def test_one_prompt_per_completion_request():
    with pytest.raises(ValidationError, match="one prompt"):
        CompletionRequest(model="m", prompt=["a", "b"])
    with pytest.raises(ValidationError, match="suffix"):
        CompletionRequest(model="m", prompt="a", suffix="b")


def test_context_fit_takes_the_longest_prefix_within_the_budget():
    from serving.context import fit

    rendered = []

    def render(docs):
        rendered.append(len(docs))
        return [0] * (10 + sum(len(d) for d in docs))

    docs = ["aaaa", "bbbbbb", "cc", "dddddddd"]
    assert fit(docs, 12, render, base=10) == ([0] * 22, 3)
    assert fit(docs, 100, render, base=10)[1] == 4 and fit(docs, 3, render, base=10) == ([0] * 10, 0)
    assert max(rendered) <= 4 and len(rendered) < 12  # bisection, not one rendering per prefix
