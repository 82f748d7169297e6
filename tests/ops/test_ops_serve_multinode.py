"""Serving on a real multi-node Ray cluster on loopback: two replicas on two worker nodes, one
node lost under load, the replica count restored when a node comes back.

Head (1 CPU: the Serve controller and the proxy clients talk to) + two worker nodes carrying
`serve_node: 1`; the deploy asks for that resource per replica and `max_replicas_per_node: 1`,
so each replica sits on its own worker node. The checkpoint is on S3 (moto): no replica reads
another node's disk. Every node runs its own Serve proxy on its own port (Ray's
RAY_SERVE_WORKER_PROXY_HTTP_PORT; all nodes share 127.0.0.1 here).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import httpx
import pytest
import yaml

from infra.loopback_cluster import serve_proxy_url, start_loopback_cluster, wait_for
from infra.s3_endpoint import free_port
from orchestrator.serve.proxy_errors import REPLICA_LOST_MESSAGE
from workers import storage

pytestmark = pytest.mark.integration

NODE_RESOURCE = "serve_node"
APP = "mn-serve"
MAX_ONGOING = 8  # the most requests one replica holds at once: the most a lost replica can fail
CLIENTS = 64


@pytest.fixture(scope="module")
def cluster():
    cluster = start_loopback_cluster(2, {NODE_RESOURCE: 1}, prefix="mnserve")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def s3_checkpoint(s3_endpoint, tmp_path_factory) -> str:
    import torch

    from model import GPT, GPTConfig, GPTTokenizer, save_pretrained

    directory = tmp_path_factory.mktemp("mnserve-ckpt")
    tokenizer = GPTTokenizer.train(["Alice lives in Paris. Bob lives in Rome."] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    save_pretrained(directory, GPT(config), config, tokenizer)
    (directory / "trainer_state.json").write_text(json.dumps({"kind": "finetune", "step": 1}))
    storage.ensure_bucket("s3://mnserve")
    storage.upload_dir(str(directory), "s3://mnserve/ckpt")
    return "s3://mnserve/ckpt"


def _replicas(cluster) -> list[dict]:
    """The app's replicas as Serve reports them (state, node id), from the head's dashboard."""
    with urllib.request.urlopen(f"{cluster.head.dashboard_url}/api/serve/applications/", timeout=10) as response:
        apps = json.loads(response.read()).get("applications", {})
    deployments = apps.get(APP, {}).get("deployments", {})
    return [replica for deployment in deployments.values() for replica in deployment.get("replicas", [])]


def _running_nodes(cluster) -> set[str]:
    return {r["node_id"] for r in _replicas(cluster) if r.get("state") == "RUNNING"}


class _Load:
    """`CLIENTS` threads, each sending one /v1/completions after another until stopped."""

    def __init__(self, url: str) -> None:
        self.url, self.results, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/v1/completions",
                                           json={"prompt": "Alice lives in", "max_tokens": 4, "temperature": 0})
                    self.results.append((response.status_code, response.headers.get("retry-after"),
                                         response.text))
                except httpx.HTTPError as error:
                    self.results.append((None, None, repr(error)))

    def __enter__(self) -> "_Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def test_replicas_on_two_nodes_survive_losing_one(cluster, s3_checkpoint, tmp_path):
    spec = {"kind": "deploy", "name": APP, "checkpoint": s3_checkpoint, "port": free_port(), "num_replicas": 2,
            "cpus_per_replica": 1, "max_replicas_per_node": 1, "resources_per_replica": {NODE_RESOURCE: 1},
            "max_ongoing_requests": MAX_ONGOING, "max_batch_size": 8}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "deploy", str(path),
                           "--address", cluster.head.gcs_address], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    url = re.search(r" at (http://\S+) ", done.stdout).group(1)

    # one replica per worker node, none on the head
    workers = {node.node_id for node in cluster.nodes}
    assert wait_for(lambda: _running_nodes(cluster) == workers, 60, "a replica on each worker node")

    # the proxy of another node (a worker's, not the head's) answers too, and a 50 MB upload
    # sent through it by a client that writes the whole body before reading gets the 413
    survivor, doomed = cluster.nodes
    other_proxy = serve_proxy_url(survivor)
    wait_for(lambda: _ok(f"{other_proxy}/healthz"), 60, "the worker node's Serve proxy")
    oversized = urllib.request.Request(f"{other_proxy}/v1/completions", data=b"x" * (50 * 1024 * 1024),
                                       headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(oversized, timeout=60)
    assert refused.value.code == 413 and "exceeds the limit" in json.loads(refused.value.read())["error"]["message"]

    # 64 clients on the head's proxy; one worker node dies under them
    with _Load(url) as load:
        wait_for(lambda: len(load.results) >= 50, 60, "the first answers under load")
        doomed.kill()
        wait_for(lambda: _running_nodes(cluster) == {survivor.node_id}, 60, "Serve to see the replica gone")
        served_after = len(load.results)
        wait_for(lambda: len(load.results) >= served_after + 100, 60, "answers from the replica left")
    statuses = Counter(status for status, _, _ in load.results)
    print(f"[serve-multinode] {len(load.results)} requests from {CLIENTS} clients, node lost mid-load: {dict(statuses)}")
    failed = [result for result in load.results if result[0] != 200]
    assert all(status == 503 and retry == "1" and REPLICA_LOST_MESSAGE in text for status, retry, text in failed), \
        (statuses, failed[:3])
    assert len(failed) <= MAX_ONGOING, statuses  # only what the lost replica held

    # a node comes back: Serve places the second replica again
    returned = cluster.add_node({NODE_RESOURCE: 1})
    assert wait_for(lambda: _running_nodes(cluster) == {survivor.node_id, returned.node_id}, 120,
                    "the replica count restored on the returned node")
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Bob", "max_tokens": 2}, timeout=60).status_code == 200


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
