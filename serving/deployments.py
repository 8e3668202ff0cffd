"""The Ray Serve application: Ingress (FastAPI) -> Selector (-> one deployment per index shard), Trainer,
Generator, composed with handles.

Each deployment is a thin wrapper around a plain service object (`serving.services`); resources, custom
resources for placement and autoscaling come from `Settings.deploy` and are always pinned. `build(settings)`
returns the bound application; `app_builder` is the entry point for `serve run` / `serve deploy` of
`deploy/serve_config.yaml`. The number of shard deployments is read from the index manifest.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from selection.manifest import IndexManifest
from serving.app import create_app
from serving.availability import ServeAvailability
from serving.clients import GeneratorHandle, SelectorHandle, ShardClient, TrainerHandle
from serving.config import Resources, Settings
from serving.engines import SamplingDefaults, context_length
from serving.metrics import RayMetrics
from serving.openai_server import OpenAIServer
from serving.services import GeneratorService, SelectorService, ShardService, TrainerService, index_dir, model_dir
from serving.session_router import ROUTER_CLASS

log = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class Ingress:
    """OpenAI routes; everything heavy happens in the three deployments behind it.

    The FastAPI app is built in the replica (after the constructor), around this replica's server.
    """

    def __init__(
        self,
        settings: Settings,
        selector: DeploymentHandle,
        trainer: DeploymentHandle,
        generator: DeploymentHandle,
        shards: list[str],
    ) -> None:
        from transformers import AutoTokenizer

        model = model_dir(settings)
        availability = ServeAvailability(serve.get_replica_context().app_name)
        retry = settings.server.retry_after_s

        self.server = OpenAIServer(
            settings,
            AutoTokenizer.from_pretrained(model),
            SelectorHandle(selector, "selector", ["Selector", *shards], availability, retry),
            TrainerHandle(trainer, "trainer", ["Trainer"], availability, retry),
            GeneratorHandle(generator, "generator", ["Generator"], availability, retry),
            context_length(model, settings.generator),
            settings.server.served_model_name or model.name,
            SamplingDefaults.from_model(model),
            RayMetrics(),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server, behind_serve_proxy=True)


class ShardedSelector(SelectorService):
    """The Selector of a sharded index: it embeds, asks every shard deployment for its top-K, merges, and
    runs SIFT once on the merged candidates."""

    def __init__(self, settings: Settings, shards: list[DeploymentHandle]) -> None:
        timeout = settings.server.shard_timeout_s
        super().__init__(settings, [ShardClient(handle, timeout) for handle in shards])


ROUTERS = {"Trainer": ROUTER_CLASS}
"""Deployments routed by our own router rather than Serve's default: the Trainer, by conversation."""


def deployment_options(resources: Resources, name: str) -> dict[str, Any]:
    """Ray Serve options for one deployment, from its `Resources` (also what `sift-serve deploy config` writes)."""
    actor: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
    if resources.resources:
        actor["resources"] = dict(resources.resources)
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": resources.max_ongoing_requests,
        "max_queued_requests": resources.max_queued_requests,
        "ray_actor_options": actor,
    }
    if name in ROUTERS:
        options["request_router_config"] = {"request_router_class": ROUTERS[name]}
    if resources.autoscaling is not None:
        options["autoscaling_config"] = resources.autoscaling.model_dump()
    else:
        options["num_replicas"] = resources.replicas
    return options


def shard_names(settings: Settings) -> list[str]:
    """The index shards' deployment names (none for an unsharded index), from the index manifest."""
    return [f"Shard{i}" for i in range(IndexManifest.read(index_dir(settings)).shards)]


def build(settings: Settings) -> serve.Application:
    """The application graph, every deployment's resources pinned from `settings.deploy`."""
    s = settings.deploy
    shards = [
        serve.deployment(ShardService).options(**deployment_options(s.shard, name)).bind(settings, i)
        for i, name in enumerate(shard_names(settings))
    ]
    selector_options = deployment_options(s.selector, "Selector")
    if shards:
        selector = serve.deployment(ShardedSelector).options(**selector_options).bind(settings, shards)
    else:
        selector = serve.deployment(SelectorService).options(**selector_options).bind(settings)
    trainer = serve.deployment(TrainerService).options(**deployment_options(s.trainer, "Trainer")).bind(settings)
    generator = (
        serve.deployment(GeneratorService)
        .options(**deployment_options(s.generator, "Generator"))
        .bind(settings, ray_metrics=True)
    )
    # Admission is Ray Serve's, so it holds for any number of Ingress replicas: beyond max_ongoing_requests
    # per replica and max_queued_requests waiting, a request gets 429 with Retry-After from Serve's proxy.
    backpressure = BackpressureConfig(status_code=429, retry_after_s=settings.server.retry_after_s)
    ingress = Ingress.options(**deployment_options(s.ingress, "Ingress"), backpressure_config=backpressure)
    return ingress.bind(settings, selector, trainer, generator, shard_names(settings))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run` entry point: args may hold `config` (a sift-serve YAML path) and/or inline sections, which
    are merged key by key over the file (and the environment)."""
    args = dict(args or {})
    config = args.pop("config", None)
    settings = Settings.load(config, overrides=args)
    index = index_dir(settings)
    if not (index / "manifest.json").is_file():
        raise FileNotFoundError(f"no index at {index}: run `make setup` (or `sift-serve index build`) first")
    return build(settings)
