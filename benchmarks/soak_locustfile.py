"""The soak's users (locust): a mix of what real clients do to the server, each outcome checked.

Run by `benchmarks.soak` (`locust -f benchmarks/soak_locustfile.py --headless ...`); `SOAK_MODEL` names the
served model. A request counts as a locust failure unless it got the answer its kind expects: a complete
answer, a clean OpenAI-shaped 4xx for invalid input, or (for clients that hang up) nothing more to check
than that the server let them go. 503 and 429 with Retry-After are clean refusals, counted by name.
"""

from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

MODEL = os.environ.get("SOAK_MODEL", "SmolLM2-135M-Instruct")
PROMPTS = [
    "How do I read rows from a CSV file?",
    "How can I parse command line arguments?",
    "How do I compute a SHA-256 hash of a string?",
    "How can I walk a directory tree?",
]
ADAPT = {"max_steps": 2, "max_train_tokens": 64, "progress": True}
INVALID = [
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "adaptation": {"max_steps": 10**6}},
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"model": MODEL, "prompt": "x", "suffix": "y"},
]


def _messages() -> list[dict]:
    return [{"role": "user", "content": random.choice(PROMPTS)}]


def _refused(response) -> bool:
    """A clean refusal under load or while a part restarts: 429/503 with Retry-After."""
    return response.status_code in (429, 503) and bool(response.headers.get("retry-after"))


class Client(HttpUser):
    wait_time = between(0.0, 0.5)

    def _check(self, response, expect_json: bool = True) -> None:
        if _refused(response):
            response.success()
        elif response.status_code != 200:
            response.failure(f"status {response.status_code}: {response.text[:200]}")
        elif expect_json and not response.json().get("choices"):
            response.failure("no choices in the answer")
        else:
            response.success()

    @task(3)
    def chat_adapted(self) -> None:
        body = {
            "model": MODEL,
            "messages": _messages(),
            "max_tokens": 8,
            "adaptation": {"max_steps": 2, "max_train_tokens": 64},
        }
        with self.client.post("/v1/chat/completions", json=body, name="chat adapted", catch_response=True) as r:
            self._check(r)

    @task(3)
    def chat_plain_stream(self) -> None:
        body = {
            "model": MODEL,
            "messages": _messages(),
            "max_tokens": 8,
            "stream": True,
            "adaptation": {"enabled": False},
        }
        with self.client.post(
            "/v1/chat/completions", json=body, name="chat plain stream", stream=True, catch_response=True
        ) as r:
            lines = [line for line in r.iter_lines() if line] if r.status_code == 200 else []
            if r.status_code == 200 and lines[-1] != b"data: [DONE]":
                r.failure("stream did not end with [DONE]")
            elif any(b'"error"' in line for line in lines):
                r.failure("error event in the stream")
            else:
                self._check(r, expect_json=False)

    @task(2)
    def completion(self) -> None:
        body = {"model": MODEL, "prompt": "import csv\n", "max_tokens": 8, "adaptation": {"enabled": False}}
        with self.client.post("/v1/completions", json=body, name="completion plain", catch_response=True) as r:
            self._check(r)

    @task(3)
    def hang_up(self) -> None:
        """Stream an adapted request and disconnect before training, during it, or during generation."""
        when = random.choice(["before training", "during training", "during generation"])
        body = {"model": MODEL, "messages": _messages(), "max_tokens": 32, "stream": True, "adaptation": ADAPT}
        with self.client.post(
            "/v1/chat/completions", json=body, name=f"disconnect {when}", stream=True, catch_response=True
        ) as r:
            if r.status_code != 200:
                self._check(r, expect_json=False)
                return
            for line in r.iter_lines():
                if when == "before training":
                    break
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if when == "during training" and event.get("adaptation", {}).get("stage") == "training":
                    break
                if when == "during generation" and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    break
            r.close()
            r.success()

    @task(1)
    def invalid(self) -> None:
        body = random.choice(INVALID)
        route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        with self.client.post(route, json=body, name="invalid", catch_response=True) as r:
            error = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            if r.status_code in (400, 404) and error and set(error) == {"message", "type", "param", "code"}:
                r.success()
            else:
                r.failure(f"invalid request got {r.status_code}: {r.text[:200]}")
