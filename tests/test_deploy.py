"""The deployment files are what the code says they are: the Serve config is the generator's output, the
RayService embeds it, the images install what the README installs, and /dev/shm holds what goes there."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adapters.config import LayerScope
from serving.cli import app
from serving.config import Settings
from serving.deployments import deployment_options
from serving.serve_config import render

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLUSTER = "deploy/sift-serve.cluster.yaml"
COMMAND = f"sift-serve deploy config --config {CLUSTER}"


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch):
    for name in os.environ:
        if name.startswith("SIFT_SERVE_") and name != "SIFT_SERVE_CACHE":
            monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT)


def cluster_settings() -> Settings:
    return Settings.load(ROOT / CLUSTER)


def test_serve_config_is_the_generators_output():
    assert (DEPLOY / "serve_config.yaml").read_text() == render(cluster_settings(), COMMAND), (
        f"regenerate it: {COMMAND} > deploy/serve_config.yaml"
    )
    result = CliRunner().invoke(app, ["deploy", "config", "--config", CLUSTER])
    assert result.exit_code == 0 and result.output == (DEPLOY / "serve_config.yaml").read_text()


def test_serve_config_args_rebuild_the_same_settings():
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "serving.deployments:app_builder"
    assert Settings.load(overrides=application["args"]) == cluster_settings()
    settings = cluster_settings()
    for entry in application["deployments"]:
        section = getattr(settings.deploy, entry["name"].lower())
        assert deployment_options(section, entry["name"]) == entry


def test_autoscaling_and_placement_options():
    settings = cluster_settings()
    ingress = deployment_options(settings.deploy.ingress, "Ingress")
    assert "num_replicas" not in ingress and ingress["autoscaling_config"]["max_replicas"] == 4
    assert deployment_options(settings.deploy.shard, "Shard0")["ray_actor_options"]["resources"] == {"index_shard": 1}
    trainer = deployment_options(settings.deploy.trainer, "Trainer")
    assert trainer["num_replicas"] == 1 and trainer["ray_actor_options"]["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="fixed replicas"):
        Settings.model_validate({"deploy": {"trainer": {"num_cpus": 1, "autoscaling": {"max_replicas": 2}}}})
    with pytest.raises(ValueError, match="max_replicas"):
        Settings.model_validate(
            {"deploy": {"ingress": {"num_cpus": 1, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}}}
        )


def _memory(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(quantity))
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def adapter_bytes(model_dir: Path, rank: int, targets: list[str], scope: LayerScope) -> int:
    """Bytes of one float32 LoRA adapter of `rank` on the projections `targets` of the layers `scope`
    names in a Llama model."""
    c = json.loads((model_dir / "config.json").read_text())
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    shapes |= {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    layers = scope.layers(c["num_hidden_layers"])
    count = c["num_hidden_layers"] if layers is None else len(layers)
    return 4 * rank * count * sum(sum(shapes[t]) for t in targets)


def test_rayservice_embeds_the_serve_config_and_sizes_shm(default_model_dir):
    service = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    settings = cluster_settings()
    # CPU workers hold the Selector and shards (custom resource), GPU workers the Trainer and Generator.
    assert json.loads(json.loads(groups["cpu"]["rayStartParams"]["resources"]))["index_shard"] >= 2
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    assert settings.deploy.trainer.num_gpus + settings.deploy.generator.num_gpus <= 1
    one = adapter_bytes(
        default_model_dir, settings.trainer.rank, settings.trainer.target_modules, settings.trainer.layers
    )
    adapters = settings.generator.max_loras * one
    assert 4e6 < one < 6e6  # "about 5 MB" in the comments
    for spec in [cluster["headGroupSpec"], *groups.values()]:
        pod = spec["template"]["spec"]
        (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert all({"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"] for c in pod["containers"])
        needed = int(spec["rayStartParams"]["object-store-memory"]) + adapters
        assert _memory(shm["emptyDir"]["sizeLimit"]) >= needed
    images = {c["image"] for g in groups.values() for c in g["template"]["spec"]["containers"]}
    assert images == {"sift-serve:cpu", "sift-serve:gpu"}


def _readme_commands() -> set[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return {line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()}


@pytest.mark.parametrize("image", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_install_what_the_readme_installs(image):
    runs = re.findall(r"^RUN (.+?)(?<!\\)$", (DEPLOY / "docker" / image).read_text(), flags=re.M | re.S)
    installs = [r for r in runs if not r.startswith("apt-get")]
    assert installs, "the image installs nothing"
    readme = _readme_commands()
    for command in installs:
        assert command in readme, f"{image} runs `{command}`, which the README does not tell users to run"


def test_api_keys_never_reach_the_serve_config():
    settings = Settings.load(ROOT / CLUSTER, {"server": {"api_keys": ["sk-very-secret"]}})
    text = render(settings, COMMAND)
    assert "sk-very-secret" not in text and "SIFT_SERVE_SERVER__API_KEYS" in text
    (application,) = yaml.safe_load(text)["applications"]
    assert "api_keys" not in application["args"].get("server", {})
    service = (DEPLOY / "kuberay" / "rayservice.yaml").read_text()
    assert "SIFT_SERVE_SERVER__API_KEYS" in service and "secretKeyRef" in service
