"""The cluster path on one machine: two Ray nodes started with `ray start` (a head with the `index_shard`
resource, a worker with a logical GPU), the committed `deploy/serve_config.yaml` deployed with `serve deploy`
onto a sharded index, replicas placed where the config says, adapted answers equal to the unsharded index's
picks, metrics in Ray's export, and a worker that dies and comes back: clean 503s with Retry-After while it
is gone, answers again once it is back. Every process is started here and stopped by the fixture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import free_port, scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "How do I read rows from a CSV file?"
ADAPT = {"adaptation": {"max_steps": 2, "max_train_tokens": 64, "min_gain": 0}}
PLAIN = {"adaptation": {"enabled": False}}


class RayNode:
    """One `ray start --block` node in its own process group: stopping the group stops the node's raylet
    and every worker it started, as if the machine had gone away."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        ports = ["--metrics-export-port", str(self.metrics_port)]
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
            ports += [flag, str(free_port())]
        log = (self.logs / f"{self.name}.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *self.args, *ports],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """The node dies at once (SIGKILL to its whole process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.process = None

    def stop(self) -> None:
        """Ray's own shutdown (SIGTERM drains the node), then whatever is left is killed."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(45)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def wait_for(what: str, check: Callable[[], object], timeout_s: float, every_s: float = 2.0):
    """Poll `check` until it returns something true; errors count as not yet (services are starting)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})")


class Cluster:
    def __init__(self, root: Path, sharded_index: Path) -> None:
        self.root = root
        self.gcs, self.dashboard, self.http = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "SIFT_SERVE_INDEX_PATH": str(sharded_index),
            # Notice a dead node within seconds rather than the default half minute.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env = env
        common = ["--object-store-memory", str(150 * 2**20)]
        self.head = RayNode(
            "head",
            [
                "--head",
                f"--port={self.gcs}",
                f"--dashboard-port={self.dashboard}",
                "--dashboard-host=127.0.0.1",
                f"--temp-dir={root / 'head'}",
                "--num-cpus=4",
                '--resources={"index_shard": 3}',
                *common,
            ],
            env,
            root,
        )
        # A logical GPU: Ray places the Trainer and Generator (num_gpus 0.5 each) here; they run on the CPU.
        # Its 2 logical CPUs are exactly theirs, so nothing else lands on this node.
        self.worker = RayNode(
            "worker",
            [f"--address=127.0.0.1:{self.gcs}", "--num-cpus=2", "--num-gpus=1", *common],
            env,
            root,
        )

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=self.env, capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def nodes(self) -> dict[str, dict]:
        """Alive nodes by id, with their resources (Ray's state API, through the dashboard)."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
        return {n.node_id: n.resources_total for n in nodes if n.state == "ALIVE"}

    def application(self) -> dict:
        reply = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10).json()
        return reply["applications"]["sift-serve"]

    def running(self) -> bool:
        return self.application()["status"] == "RUNNING"

    def running_on_cpu(self) -> bool:
        deployments = self.application()["deployments"]
        names = ("Ingress", "Selector", "Shard0", "Shard1")
        return all(name in deployments and deployments[name]["status"] == "HEALTHY" for name in names)


@pytest.fixture(scope="module")
def cluster(small_index, tmp_path_factory) -> Iterator[Cluster]:
    from selection.shards import split_index

    sharded = split_index(small_index.directory, tmp_path_factory.mktemp("cluster") / "sharded", 2, progress=False)
    root = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # Ray's socket paths must stay short
    c = Cluster(root, sharded)
    try:
        c.head.start()
        wait_for("the head node", lambda: len(c.nodes()) == 1, 120)
        address = f"127.0.0.1:{c.gcs}"
        c.cli(
            "serve",
            "start",
            f"--address={address}",
            "--http-host=127.0.0.1",
            f"--http-port={c.http}",
            "--proxy-location=HeadOnly",
        )
        c.cli("serve", "deploy", str(ROOT / "deploy" / "serve_config.yaml"), f"--address={c.dashboard_url}")
        # The GPU node joins once the CPU side runs, so that the Ingress (which may run anywhere) is on the head
        # and the worker's two CPUs are left to the Trainer and Generator, which can only run there.
        wait_for("the CPU deployments", lambda: c.running_on_cpu(), 600, every_s=5)
        c.worker.start()
        wait_for("the worker node", lambda: len(c.nodes()) == 2, 120)
        wait_for("the application to run", c.running, 900, every_s=5)
        yield c
    finally:
        c.worker.stop()
        c.head.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def chat(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout)


def test_replicas_land_on_the_nodes_the_config_names(cluster):
    nodes = cluster.nodes()
    (gpu_node,) = [node for node, resources in nodes.items() if resources.get("GPU")]
    (shard_node,) = [node for node, resources in nodes.items() if resources.get("index_shard")]
    deployments = cluster.application()["deployments"]
    assert set(deployments) == {"Ingress", "Selector", "Shard0", "Shard1", "Trainer", "Generator"}
    where = {name: {r["node_id"] for r in d["replicas"]} for name, d in deployments.items()}
    for name in ("Selector", "Shard0", "Shard1"):
        assert where[name] == {shard_node}, name
    for name in ("Trainer", "Generator"):
        assert where[name] == {gpu_node}, name


def test_adapted_answer_picks_what_the_unsharded_index_picks(cluster, small_index, minilm):
    from selection.selector import Selector
    from serving.config import Settings
    from serving.contracts import resolve
    from serving.protocol import AdaptationOptions

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=300, max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, extra_body=ADAPT
    )
    report = answer.model_extra["adaptation"]
    assert report["steps"] == 2 and report["error"] is None and answer.choices[0].message.content
    settings = Settings.load(ROOT / "deploy" / "sift-serve.cluster.yaml")
    spec = resolve(AdaptationOptions(**ADAPT["adaptation"]), settings)
    whole = Selector(small_index, minilm).select([PROMPT], spec.selection)[0]
    assert [d["id"] for d in report["documents"]] == [d.id for d in whole.documents]


def test_metrics_are_rays_from_every_node(cluster):
    assert chat(cluster.url, PLAIN).status_code == 200
    requests = wait_for(
        "the Ingress's metrics", lambda: scrape(cluster.head.metrics_url, "ray_sift_requests_total"), 90
    )
    assert requests >= 1
    running = wait_for(
        "vLLM's metrics",
        lambda: scrape(cluster.worker.metrics_url, "ray_vllm_num_requests_running") is not None,
        90,
    )
    assert running
    # The proxy exports on its own interval, so its counter can lag the Ingress's by one export.
    served = wait_for(
        "Serve's HTTP metrics", lambda: scrape(cluster.head.metrics_url, "ray_serve_num_http_requests_total"), 90
    )
    assert served >= 1


def test_a_lost_node_gives_503_with_retry_after_then_recovers(cluster):
    cluster.worker.kill()
    outcomes = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(outcomes) < 4:
        started = time.monotonic()
        response = chat(cluster.url, ADAPT if len(outcomes) % 2 == 0 else PLAIN, timeout=60)
        outcomes.append((response.status_code, response.headers.get("retry-after"), time.monotonic() - started))
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "unavailable"
    assert len(outcomes) == 4, f"requests hung while the worker was down: {outcomes}"
    assert all(status == 503 and retry is not None for status, retry, _ in outcomes), outcomes

    cluster.worker.start()
    wait_for("the worker node to rejoin", lambda: len(cluster.nodes()) == 2, 120)
    back = wait_for("an adapted answer again", lambda: chat(cluster.url, ADAPT, timeout=120).status_code == 200, 900, 5)
    assert back
    assert chat(cluster.url, ADAPT).json()["adaptation"]["steps"] == 2
