"""Continuous batching of training steps: an adapter trained for a request in a batch with others equals
the adapter trained for it alone (the contract), with batch-mates of other lengths joining and leaving
at other steps; and the per-slot optimizer is AdamW exactly."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters.config import TrainerConfig
from adapters.slot_adamw import SlotAdamW
from adapters.spec import TrainRequest, TrainResult
from adapters.trainer import Trainer
from tests.conftest import STDLIB, tiny_llama_dir, train_request

DOCS = {name: (STDLIB / name).read_text() for name in ("bisect.py", "fnmatch.py", "heapq.py", "shlex.py")}


def test_slot_adamw_is_adamw_per_slot():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(3, 50))
    reference = [torch.nn.Parameter(weights[s].detach().clone()) for s in range(3)]
    optimizers = [
        torch.optim.AdamW([p], lr=lr, eps=1e-8, weight_decay=0.01)
        for p, lr in zip(reference, (1e-2, 3e-3, 1e-1), strict=True)
    ]
    ours = SlotAdamW([weights])
    for s, lr in enumerate((1e-2, 3e-3, 1e-1)):
        ours.reset(s, lr, 0.01)
    schedule = [[0, 1], [0], [0, 1, 2], [2], [0, 2]]  # slots join and leave
    for slots in schedule:
        grads = torch.randn(3, 50)
        weights.grad = torch.zeros_like(weights)
        for s in slots:
            weights.grad[s] = grads[s]
            reference[s].grad = grads[s].clone()
            optimizers[s].step()
        ours.step(slots)
    for s in range(3):
        assert torch.allclose(weights[s], reference[s], rtol=1e-6, atol=1e-7), s


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def requests(spec: dict, short_lr: float = 3e-3) -> dict[str, TrainRequest]:
    """Four requests of other lengths, step counts and arrival times over the test's `spec`; `short` has its
    own learning rate."""
    return {
        "long": train_request([DOCS["bisect.py"], DOCS["heapq.py"]] * 2, **{**spec, "max_train_tokens": 96, "seed": 1}),
        "short": train_request([DOCS["fnmatch.py"][:300]] * 4, **{**spec, "learning_rate": short_lr, "seed": 2}),
        "leaves_early": train_request(
            [DOCS["shlex.py"]] * 4, **{**spec, "max_steps": 2, "max_train_tokens": 48, "seed": 3}
        ),
        "joins_late": train_request([DOCS["heapq.py"][:700], DOCS["bisect.py"][:200]] * 2, **{**spec, "seed": 4}),
    }


def train_alone(trainer: Trainer, spec: dict, short_lr: float = 3e-3) -> dict[str, TrainResult]:
    return {name: trainer.train(request) for name, request in requests(spec, short_lr).items()}


def train_together(trainer: Trainer, spec: dict, short_lr: float = 3e-3) -> tuple[dict[str, TrainResult], list[int]]:
    """All four at once: three start together, the fourth joins after the first one's second step."""
    batch_sizes: list[int] = []
    run_step = trainer.step.run

    def recording_step(rows):
        batch_sizes.append(len(rows))
        return run_step(rows)

    trainer.step.run = recording_step
    reqs, out, threads = requests(spec, short_lr), {}, []

    def run(name: str, progress=None) -> None:
        out[name] = trainer.train(reqs[name], progress=progress)

    def start(name: str, progress=None) -> None:
        thread = threading.Thread(target=run, args=(name, progress))
        threads.append(thread)
        thread.start()

    def launch_late(done) -> None:
        if done.step == 2:
            start("joins_late")

    start("long", launch_late)
    start("short")
    start("leaves_early")
    while len(threads) < 4 or any(t.is_alive() for t in threads):
        for t in list(threads):
            t.join(0.05)
    return out, batch_sizes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


def test_batched_adapters_equal_adapters_trained_alone(tiny, tmp_path):
    config = TrainerConfig(max_batch=4)
    spec = dict(max_steps=8, max_train_tokens=64, learning_rate=1e-2, time_budget_s=None)
    alone = train_alone(Trainer(tiny, config.model_copy(update={"max_batch": 1})), spec)
    together, batch_sizes = train_together(Trainer(tiny, config), spec)
    assert max(batch_sizes) >= 3, batch_sizes  # they really shared steps
    for name in alone:
        assert max_relative_difference(together[name].adapter.tensors(), alone[name].adapter.tensors()) <= 1e-4, name


def frobenius_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


@pytest.mark.slow
def test_batched_gradients_equal_alone_on_the_default_model(default_model_dir, tmp_path):
    """On the real model, a padded batch-mate changes a request's gradient only by float rounding (<= 1e-4), and
    each request's loss at every step stays within 1e-4 of its loss trained alone. Adam's normalised steps
    amplify that rounding where a gradient is near zero (its sign flips), so after 4 steps the element-wise
    difference grows past 1e-4 while the tensors as a whole stay within 1e-2 (measured: 1.4e-3 at most).
    `short` trains at 1e-3 here: at 3e-3 its loss on the real model rises again at step 4 (1.27 -> 3.38),
    and an unstable step amplifies rounding without bound (2.1e-2), which says nothing about batching."""
    config = TrainerConfig(max_batch=4)
    spec = dict(max_steps=4, max_train_tokens=48, time_budget_s=None)
    trainer = Trainer(default_model_dir, config)
    step = trainer.step
    short = step.tokens(DOCS["fnmatch.py"][:300], 48)
    long = step.tokens(DOCS["bisect.py"], 96)

    def gradient(ids: torch.Tensor, mask: torch.Tensor, slots: list[int]) -> list[torch.Tensor]:
        step.bank.reset(0, 2)
        step.bank.reset(1, 1)
        with torch.no_grad():  # a non-zero B, so every LoRA tensor has a gradient
            for layer in step.bank.layers:
                layer.lora_b.copy_(torch.linspace(-0.01, 0.01, layer.lora_b.numel()).view_as(layer.lora_b))
        with step.bank.use(slots):
            logits = step.model(input_ids=ids, attention_mask=mask).logits
        targets = torch.nn.functional.pad(ids.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100)
        token_loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(targets.shape)
        (token_loss.sum(1) / (targets != -100).sum(1)).sum().backward()
        grads = [p.grad[0].clone() for p in step.bank.lora_parameters()]
        for p in step.bank.lora_parameters():
            p.grad = None
        return grads

    alone = gradient(short[None], torch.ones_like(short)[None], [0])
    ids = torch.full((2, long.numel()), step._pad)
    mask = torch.zeros_like(ids)
    ids[0, : short.numel()], mask[0, : short.numel()] = short, 1
    ids[1], mask[1] = long, 1
    batched = gradient(ids, mask, [0, 1])
    assert max(float((b - a).norm() / a.norm()) for a, b in zip(alone, batched, strict=True)) <= 1e-4

    alone = train_alone(trainer, spec, short_lr=1e-3)
    together, batch_sizes = train_together(trainer, spec, short_lr=1e-3)
    assert max(batch_sizes) >= 3, batch_sizes
    for name in alone:
        assert together[name].steps == alone[name].steps, name
        losses = zip(together[name].losses, alone[name].losses, strict=True)
        assert max(abs(t - a) / a for t, a in losses) <= 1e-4, name
        tensors_together, tensors_alone = together[name].adapter.tensors(), alone[name].adapter.tensors()
        assert frobenius_relative_difference(tensors_together, tensors_alone) <= 1e-2, name
