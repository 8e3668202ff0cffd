"""Shared fixtures: real embedders and tokenizers from packages, small real corpora, tiny random models."""

from __future__ import annotations

import contextlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests repeat identical requests to see training happen (steps, progress, cancels); the adapter cache
# would answer the repeats without training. It is off here unless a test turns it on (tests/test_cache.py).
os.environ.setdefault("SIFT_SERVE_TRAINER__CACHE_BYTES", "0")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_CORPUS_FILES = ["glob.py", "fnmatch.py", "shlex.py", "csv.py", "bisect.py", "heapq.py"]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (`sift-serve models fetch` runs before the tests)."""
    from infra.config import default_cache_dir
    from infra.models import fetch_default_model

    return fetch_default_model(default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def minilm():
    from selection.embed import load_embedder

    return load_embedder("minilm", None)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of real text: a few standard-library modules, plus an exact duplicate of one of them."""
    root = tmp_path_factory.mktemp("corpus")
    for name in SMALL_CORPUS_FILES:
        (root / name).write_text((STDLIB / name).read_text())
    (root / "copy_of_csv.py").write_text((STDLIB / "csv.py").read_text())
    return root


@pytest.fixture(scope="session")
def small_index(small_corpus, tmp_path_factory, minilm, tokenizer):
    from selection.corpus import chunk_documents, read_corpus
    from selection.index import CorpusIndex, tokenizer_fingerprint

    out = tmp_path_factory.mktemp("index") / "idx"
    chunks = chunk_documents(read_corpus(small_corpus), tokenizer, 128)
    index = CorpusIndex.build(
        chunks,
        out,
        minilm,
        tokenizer_name="smollm2",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        chunk_tokens=128,
        chunk_overlap=0,
        progress=False,
    )
    yield index
    index.close()


def tiny_llama_dir(path: Path, seed: int = 0, vocab_size: int = 512, tokenizer_dir: Path | None = None) -> Path:
    """A tiny randomly initialised Llama saved with the default model's tokenizer (or `tokenizer_dir`'s), for
    fast unit tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from infra.config import default_cache_dir
    from infra.models import fetch_default_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or fetch_default_model(default_cache_dir()))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def greedy_hf(model_dir: Path, prompt: str, adapter_path: Path | None = None, device: str = "cpu") -> list[int]:
    """16 greedy tokens from transformers (+ peft when `adapter_path` is given), in float32: the reference
    that vLLM's output with the same adapter must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.to(device).eval().generate(ids, max_new_tokens=16, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def greedy_vllm(model_dir: Path, prompt: str, adapter_path: Path, **engine: object) -> tuple[list[int], list[int]]:
    """16 greedy tokens from vLLM in float32 without and with the LoRA adapter at `adapter_path`, for
    comparison with `greedy_hf`; `engine` adds engine arguments (a GPU memory share)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(model_dir),
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        **engine,
    )
    try:
        params = SamplingParams(max_tokens=16, temperature=0)
        base = llm.generate([prompt], params)[0].outputs[0].token_ids
        lora = LoRARequest(adapter_path.name, 1, str(adapter_path))
        adapted = llm.generate([prompt], params, lora_request=lora)[0].outputs[0].token_ids
    finally:
        del llm
    return list(base), list(adapted)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_thread(app: object) -> Iterator[str]:
    """Serve an ASGI app over real HTTP (uvicorn on a thread, a free port) and yield its root URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass(frozen=True)
class Served:
    """A running application: its HTTP root and Ray's Prometheus export (where its metrics are)."""

    url: str
    metrics_url: str

    def metric(self, name: str) -> float | None:
        """The sum of `name`'s samples over every replica, or None while Ray has not exported it yet."""
        return scrape(self.metrics_url, name)


def scrape(metrics_url: str, name: str) -> float | None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = [
        sample.value
        for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
        for sample in family.samples
        if sample.name == name
    ]
    return sum(values) if values else None


def live_adapters(server) -> float:
    """The in-process server's live-adapter gauge, read from its Prometheus exposition (0 when nothing leaked)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = server.metrics.exposition().decode()
    families = text_string_to_metric_families(text)
    return sum(s.value for f in families for s in f.samples if s.name == "sift_adapters_live")


@contextlib.contextmanager
def running_app(settings) -> Iterator[Served]:
    """The Ray Serve application for `settings` on a local Ray cluster, torn down afterwards.

    The port is chosen once Ray's own processes are up (they take ports too), and another one is tried if
    the proxy still cannot bind it.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from serving.deployments import build

    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        for attempt in range(3):
            settings.server.port = free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": settings.server.port})
                serve.run(build(settings), name="sift-serve", route_prefix="/")
                break
            except Exception:
                serve.shutdown()
                if attempt == 2:
                    raise
        yield Served(f"http://127.0.0.1:{settings.server.port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


def tiny_app_settings(model_dir: Path, index_dir: Path, **sections):
    """Settings for the application on a tiny random Llama with the transformers engine, plus `sections`."""
    from serving.config import Settings

    generator = {"engine": "transformers", "max_model_len": 512, **sections.pop("generator", {})}
    base = {"models": {"base_model": str(model_dir)}, "index_path": str(index_dir), "generator": generator}
    return Settings.model_validate({**base, **sections})


def tiny_local_server(tmp_path_factory, index_dir: Path, **sections):
    """The whole application in this process (no Ray) on a fresh tiny random Llama named `tiny-llama`, with
    the transformers engine, the index at `index_dir` and `sections` over the defaults."""
    from serving.openai_server import local_server

    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    generator = {"adapter_dir": str(tmp_path_factory.mktemp("adapters")), **sections.pop("generator", {})}
    return local_server(tiny_app_settings(tiny, index_dir, generator=generator, **sections))


@contextlib.contextmanager
def running_tiny_app(tmp_path_factory, index_dir: Path, **sections) -> Iterator[Served]:
    """`running_app` on a fresh tiny random Llama named `tiny-llama` (transformers engine) over `index_dir`."""
    tiny = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    with running_app(tiny_app_settings(tiny, index_dir, **sections)) as app:
        yield app


def train_request(documents, documents_end=None, request_id: str = "", **spec):
    """A `TrainRequest` with the server's default `TrainSpec` (`resolve` on the default settings), `spec`
    overriding its fields. The defaults are the models' own, whatever the environment sets (the GPU check
    exports partial `SIFT_SERVE_DEPLOY__*` sections that only a config file completes)."""
    import dataclasses

    from adapters.config import TrainerConfig
    from adapters.spec import TrainRequest
    from selection.stopping import StopReason
    from serving.config import AdaptationConfig, ServerConfig, Settings
    from serving.contracts import resolve

    defaults = Settings.model_construct(adaptation=AdaptationConfig(), trainer=TrainerConfig(), server=ServerConfig())
    default = resolve(None, defaults).training
    end = StopReason.MAX_STEPS if documents_end is None else documents_end
    return TrainRequest(tuple(documents), dataclasses.replace(default, **spec), end, request_id)


def adapter_loss(model_dir: Path, text: str, adapter=None, max_tokens: int = 256) -> float:
    """Mean next-token loss of `text` (truncated to `max_tokens`) under the base model in `model_dir`, with a
    saved adapter (an `AdapterBlob`) loaded by peft as vLLM would load it; None: the base model alone."""
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as root:
        if adapter is not None:
            handle = adapter.write(Path(root))
            model = PeftModel.from_pretrained(model, str(handle.path))
        with torch.no_grad():
            return float(model.eval()(input_ids=ids, labels=ids).loss)


def in_process_client(server, api_key: str = "none"):
    """The official `openai` async client against `server`'s app in this process (no socket)."""
    import httpx
    import openai

    from serving.app import create_app

    transport = httpx.ASGITransport(app=create_app(server))
    return openai.AsyncOpenAI(
        base_url="http://test/v1", api_key=api_key, http_client=httpx.AsyncClient(transport=transport)
    )
