"""Bits per byte against a peer: lm-evaluation-harness's `loglikelihood_rolling` on the default model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.bpb import bits_per_byte, log_likelihood, rolling_windows
from tests.conftest import STDLIB

TEXTS = [
    (STDLIB / "this.py").read_text(),  # ROT13: far from anything the model knows
    (STDLIB / "bisect.py").read_text()[:3000],
    "Les sanglots longs des violons de l'automne blessent mon cœur d'une langueur monotone. 🎻",
]


@pytest.mark.parametrize("count,max_length", [(1, 4), (4, 4), (5, 4), (13, 4), (100, 32)])
def test_windows_predict_every_token_once_with_full_context(count, max_length):
    predicted_positions = []
    for start, end, predicted in rolling_windows(count, max_length):
        assert end - start <= max_length and predicted <= end - start
        assert start == 0 or end - start == max_length  # later windows carry a full context
        predicted_positions += list(range(end - predicted + 1, end + 1))
    assert predicted_positions == list(range(1, count + 1))


@pytest.mark.slow
def test_matches_lm_evaluation_harness(default_model_dir, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    max_length = 128  # short windows, so the long texts span several
    peer = HFLM(pretrained=str(default_model_dir), device="cpu", batch_size=1, max_length=max_length)
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i) for i, text in enumerate(TEXTS)
    ]
    theirs = peer.loglikelihood_rolling(requests)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for text, their_nats in zip(TEXTS, theirs, strict=True):
        n_bytes = len(text.encode("utf-8"))
        ours = bits_per_byte(model, tokenizer, text, max_length)
        assert ours == pytest.approx(-their_nats / (n_bytes * math.log(2)), abs=1e-3)
    nats, scored = log_likelihood(model, tokenizer, TEXTS[0], max_length)
    assert scored > 2 * max_length and nats < 0
