"""A multi-node Ray cluster on one host (head + N worker nodes, each its own `ray start`), and the
helpers a node-loss test or bench needs: which node runs a job's training workers, and when the
job's steps were logged. Used by tests/ops/test_ops_node_loss.py and bench/multinode_scaling.py.

Node death is noticed by the GCS's health checks of each raylet: Ray's defaults (a check every
3 s, dead after 5 misses) leave ~15 s between a machine vanishing and Ray Train restarting;
`FAST_NODE_DEATH_ENV` shortens that to ~3 s on the head, as a test cluster can afford. It also
halves Ray Train's worker-group start timeout (read by the Train controller, which runs on the
driver's node, the head): right after a node dies, the elastic policy can still count the dead
node's resources, ask for a group it cannot place, and retry smaller only after that timeout.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.ray_head import RayHead, RayWorkerNode, start_ray_head, start_ray_worker
from infra.s3_endpoint import free_ports

FAST_NODE_DEATH_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                       "RAY_health_check_timeout_ms": "1000", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}


PROXY_PORT_ENV = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"  # Ray Serve's per-node proxy port (head exempt)


@dataclass
class LoopbackCluster:
    head: RayHead
    nodes: list[RayWorkerNode]
    temp_dirs: list[str] = field(default_factory=list)
    prefix: str = "loopback"
    cpus_per_node: int = 1

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.head.stop()
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)

    def node(self, node_id: str) -> RayWorkerNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def add_node(self, resources: dict[str, float], wait: bool = True) -> RayWorkerNode:
        """Start one more worker node (a lost machine coming back, or a new one), with its own temp
        dir and its own Serve proxy port: every node here shares the host's 127.0.0.1."""
        index = len(self.nodes) + 1
        temp_dir = tempfile.mkdtemp(prefix=f"{self.prefix}{index}_", dir="/tmp")
        self.temp_dirs.insert(-1, temp_dir)
        node = start_ray_worker(self.head, num_cpus=self.cpus_per_node, resources=resources, temp_dir=temp_dir,
                                log_path=Path(self.temp_dirs[-1], f"worker{index}.log"), wait=False,
                                env={PROXY_PORT_ENV: str(free_ports(1)[0])})
        self.nodes.append(node)
        if wait:
            node.wait_joined(self.head)
        return node

    def alive_nodes(self) -> list[RayWorkerNode]:
        return [node for node in self.nodes if node.alive()]


def serve_proxy_url(node: RayWorkerNode) -> str:
    """The base URL of the Serve proxy on a loopback worker node."""
    return f"http://127.0.0.1:{node.env[PROXY_PORT_ENV]}"


def start_loopback_cluster(workers: int, resources: dict[str, float], prefix: str,
                           head_cpus: int = 1, cpus_per_node: int = 1) -> LoopbackCluster:
    """Head (runs job drivers) + `workers` nodes carrying `resources`, all joined; temp dirs under /tmp."""
    logs = tempfile.mkdtemp(prefix=f"{prefix}-logs-", dir="/tmp")
    head_dir = tempfile.mkdtemp(prefix=f"{prefix}0_", dir="/tmp")
    head = start_ray_head(temp_dir=head_dir, num_cpus=head_cpus, log_path=Path(logs, "head.log"),
                          env=FAST_NODE_DEATH_ENV)
    cluster = LoopbackCluster(head, [], [head_dir, logs], prefix=prefix, cpus_per_node=cpus_per_node)
    try:
        for _ in range(workers):  # all start at once; each knows its node id from its own temp dir
            cluster.add_node(resources, wait=False)
        for node in cluster.nodes:
            node.wait_joined(head)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def train_worker_actors(head: RayHead, state: str | None = "ALIVE") -> list[dict]:
    """Ray Train worker actors (in `state`, or all), each with its node id, from the state API."""
    keys, values = ["class_name"], ["RayTrainWorker"]
    if state:
        keys.append("state")
        values.append(state)
    query = urllib.parse.urlencode([("detail", "1"), ("limit", "1000"), *[("filter_keys", k) for k in keys],
                                    *[("filter_predicates", "=") for _ in keys],
                                    *[("filter_values", v) for v in values]])
    with urllib.request.urlopen(f"{head.dashboard_url}/api/v0/actors?{query}", timeout=10) as response:
        return json.loads(response.read())["data"]["result"]["result"]


def step_times(tracking_uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float, float]]:
    """(step, wall time in s, value) of each logged point of `key`, in logging order (a restarted
    job logs the steps after its checkpoint again)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted(((m.step, m.timestamp / 1000, m.value) for m in history), key=lambda p: p[1])


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(poll_s)
