"""The Ray Serve application: Ingress (FastAPI) -> Selector, Trainer, Generator, composed with handles.

Each deployment is a thin wrapper around a plain service object (`serving.services`); resources come
from `Settings.server` and are always pinned. `build(settings)` returns the bound application;
`app_builder` is the entry point for `serve run deploy/serve_config.yaml`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from selection.build import default_index_dir
from serving.app import create_app
from serving.clients import HandleClient
from serving.config import Resources, Settings
from serving.engines import SamplingDefaults, context_length
from serving.openai_server import OpenAIServer
from serving.services import GeneratorService, SelectorService, TrainerService, model_dir

log = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class Ingress:
    """OpenAI routes; everything heavy happens in the three deployments behind it.

    The FastAPI app is built in the replica (after the constructor), around this replica's server.
    """

    def __init__(
        self, settings: Settings, selector: DeploymentHandle, trainer: DeploymentHandle, generator: DeploymentHandle
    ) -> None:
        from transformers import AutoTokenizer

        model = model_dir(settings)
        self.server = OpenAIServer(
            settings,
            AutoTokenizer.from_pretrained(model),
            HandleClient(selector),
            HandleClient(trainer),
            HandleClient(generator),
            context_length(model, settings.generator),
            settings.server.served_model_name or model.name,
            SamplingDefaults.from_model(model),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server, behind_serve_proxy=True)


def _options(resources: Resources, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "num_replicas": resources.replicas,
        "max_ongoing_requests": resources.max_ongoing_requests,
        "max_queued_requests": resources.max_queued_requests,
        "ray_actor_options": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
    }


def build(settings: Settings) -> serve.Application:
    """The application graph, every deployment's resources pinned from `settings.server`."""
    s = settings.server
    selector = serve.deployment(SelectorService).options(**_options(s.selector, "Selector")).bind(settings)
    trainer = serve.deployment(TrainerService).options(**_options(s.trainer, "Trainer")).bind(settings)
    generator = serve.deployment(GeneratorService).options(**_options(s.generator, "Generator")).bind(settings)
    # Admission is Ray Serve's, so it holds for any number of Ingress replicas: beyond max_ongoing_requests
    # per replica and max_queued_requests waiting, a request gets 429 with Retry-After from Serve's proxy.
    backpressure = BackpressureConfig(status_code=429, retry_after_s=s.retry_after_s)
    ingress = Ingress.options(**_options(s.ingress, "Ingress"), backpressure_config=backpressure)
    return ingress.bind(settings, selector, trainer, generator)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run` entry point: args may hold `config` (a sift-serve YAML path) and/or inline sections, which
    are merged key by key over the file (and the environment)."""
    args = dict(args or {})
    config = args.pop("config", None)
    settings = Settings.load(config, overrides=args)
    index = settings.index_path or default_index_dir(settings.models)
    if not (Path(index) / "manifest.json").is_file():
        raise FileNotFoundError(f"no index at {index}: run `make setup` (or `sift-serve index build`) first")
    return build(settings)
