"""Bits per byte of a text under a causal LM, the quality benchmark's metric.

Every token is predicted exactly once, over disjoint rolling windows of at most `max_length` predicted
tokens with maximal context (the convention of lm-evaluation-harness's `loglikelihood_rolling`, checked
against it in the tests): the first window is prefixed with the tokenizer's BOS token (EOS when it has
none) and predicts the first tokens; each later window keeps `max_length` tokens of context. The summed
natural-log likelihood is divided by the text's UTF-8 byte count and ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def rolling_windows(count: int, max_length: int) -> Iterator[tuple[int, int, int]]:
    """(input_start, input_end, predicted) over the sequence [prefix] + tokens, whose `count` tokens sit at
    positions 1..count. The input is seq[input_start:input_end]; its last `predicted` logits score the
    positions input_end - predicted + 1 .. input_end."""
    done = 0
    while done < count:
        predicted = min(max_length, count - done)
        end = done + predicted  # last predicted position (1-based in seq)
        start = max(0, end - max_length)
        yield start, end, predicted
        done = end


@torch.no_grad()
def log_likelihood(model: torch.nn.Module, tokenizer, text: str, max_length: int) -> tuple[float, int]:
    """Summed natural-log likelihood of `text`'s tokens and how many tokens were scored."""
    tokens = tokenizer(text).input_ids
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    seq = torch.tensor([prefix, *tokens])
    device = next(model.parameters()).device
    total = 0.0
    for start, end, predicted in rolling_windows(len(tokens), max_length):
        inputs = seq[start:end].unsqueeze(0).to(device)
        logits = model(input_ids=inputs).logits[0, -predicted:].float()
        targets = seq[end - predicted + 1 : end + 1].to(device)
        total += float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum())
    return total, len(tokens)


def bits_per_byte(model: torch.nn.Module, tokenizer, text: str, max_length: int) -> float:
    """-log2 likelihood of `text` per UTF-8 byte."""
    nats, _ = log_likelihood(model, tokenizer, text, max_length)
    return -nats / (len(text.encode("utf-8")) * math.log(2))


@torch.no_grad()
def continuation_token_bits(model: torch.nn.Module, context_ids: list[int], continuation_ids: list[int]) -> list[float]:
    """-log2 p(token | everything before it) for each continuation token (one forward pass; context +
    continuation must fit the model)."""
    device = next(model.parameters()).device
    ids = torch.tensor([context_ids + continuation_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(context_ids) - 1 : -1].float()
    targets = ids[0, len(context_ids) :]
    return (-torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0] / math.log(2)).tolist()


def continuation_bits(model: torch.nn.Module, context_ids: list[int], continuation_ids: list[int]) -> float:
    """-log2 p(continuation | context), in bits."""
    return sum(continuation_token_bits(model, context_ids, continuation_ids))
