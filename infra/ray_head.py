"""Start a Ray head node on loopback (`ray start --head --block`) and stop exactly what it started.

Why `--block`: a plain `ray start` daemonizes (its PID exits at once and the GCS, raylet and
dashboard are re-parented to init), so nothing would tie them to the caller. Under `--block`
the `ray start` process stays alive as the parent of every Ray process of this head and, on
SIGTERM, shuts them down itself. `stop()` therefore:

1. snapshots the `ray start` process's descendants (GCS, raylet, dashboard, workers, job
   drivers — Ray starts job drivers in their own session, but they are still descendants),
2. sends SIGTERM to the `ray start` PID and waits for it,
3. ends any snapshotted descendant still alive (SIGTERM, then SIGKILL), plus any process left
   in the head's own session (started with `start_new_session=True`, so that session holds
   only processes this head started).

Every port is chosen free (GCS, dashboard, client server, agents, metrics, node/object
manager), the temp dir is the caller's own, and `RAY_AUTH_MODE=disabled` is set on the head
(see STACK_NOTES: token auth otherwise refuses a client that did not share the token).
The handle is serialisable (`to_dict` / `from_dict`), so another process can stop the head
later by PID (what `gptctl stack down` does).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.ray_env import FIXED_SIZE_ENV, PROXY_CALLBACK_ENV, default_extensions_dir
from infra.s3_endpoint import free_ports
from infra.waiting import wait_until

__all__ = ["RayHead", "RayWorkerNode", "start_ray_head", "start_ray_worker", "stop_process_tree", "process_matches"]

DASHBOARD_PORT, GCS_PORT, CLIENT_PORT, SERVE_PORT = 8265, 6379, 10001, 8000  # Ray's usual ports


@dataclass
class _RayStartProcess:
    """A `ray start --block` process gptctl started (a head or a worker node): stopped by PID with
    every process it started, never by `ray stop`."""

    pid: int
    create_time: float

    def alive(self) -> bool:
        return process_matches(self.pid, self.create_time)

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop the node and every process it started; returns the PIDs that were ended."""
        atexit.unregister(self.stop)
        ended = stop_process_tree(self.pid, self.create_time, timeout=timeout, session=True)
        self._reap()
        return ended

    def _reap(self) -> None:
        """Collect our own child's exit status, if we started it in this process."""
        process = getattr(self, "process", None)
        if process is not None:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class RayHead(_RayStartProcess):
    """A running head: its `ray start --block` PID, GCS address and dashboard (Jobs API) URL."""

    gcs_address: str
    dashboard_url: str
    client_address: str
    temp_dir: str
    log_path: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "process"}

    @classmethod
    def from_dict(cls, data: dict) -> "RayHead":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "process"})

    def healthy(self, timeout: float = 2.0) -> bool:
        return self.alive() and _http_ok(f"{self.dashboard_url}/api/version", timeout)

    def __enter__(self) -> "RayHead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def process_matches(pid: int, create_time: float | None) -> bool:
    """True if `pid` is alive and is the process we recorded (not a reused PID)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_process_tree(pid: int, create_time: float | None, timeout: float = 30.0,
                      session: bool = False) -> list[int]:
    """SIGTERM `pid` (only if it is still the recorded process), then end its leftovers.

    Leftovers are the descendants seen before the signal and, with `session=True`, processes in
    the session `pid` leads (it must have been started with `start_new_session=True`).
    """
    import psutil

    if not process_matches(pid, create_time):
        return []
    root = psutil.Process(pid)
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [root]
    if session:
        tree.extend(_session_members(pid, exclude={p.pid for p in tree}))
    try:
        root.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    _, alive = psutil.wait_procs([root], timeout=timeout)
    # the head shuts its own processes down on SIGTERM; give them a moment, then insist
    rest = [p for p in tree[1:] if _still_ours(p)]
    _, alive_rest = psutil.wait_procs(rest, timeout=min(10.0, timeout))
    for process in [*alive, *alive_rest]:
        _signal(process, signal.SIGTERM)
    _, stubborn = psutil.wait_procs([*alive, *alive_rest], timeout=5)
    for process in stubborn:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(stubborn, timeout=5)
    return [p.pid for p in tree]


def _still_ours(process) -> bool:
    try:
        return process.is_running()  # psutil compares create_time: a reused PID is not "running"
    except Exception:  # noqa: BLE001
        return False


def _signal(process, sig: int) -> None:
    try:
        if process.is_running():
            process.send_signal(sig)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _session_members(sid: int, exclude: set[int]) -> list:
    import psutil

    members = []
    for process in psutil.process_iter():
        if process.pid in exclude or process.pid == sid:
            continue
        try:
            if os.getsid(process.pid) == sid:
                members.append(process)
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return members


def _spawn_ray_start(args: list[str], *, host: str, num_cpus: int, temp_dir: str,
                     object_store_memory: int | None, log_path: str | Path | None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
    """`ray start … --block` for a head or a worker node, every port free and on `host`, in a
    session of its own (so it is stopped by PID with all it starts)."""
    ray_bin = Path(sys.executable).with_name("ray")
    taken = {int(value) for value in args if value.isdigit()}  # the head's GCS, dashboard, client ports
    ports = [port for port in free_ports(6 + len(taken), host) if port not in taken][:6]
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port")
    command = [
        str(ray_bin) if ray_bin.exists() else "ray", "start", *args, "--block", "--node-ip-address", host,
        *[item for flag, port in zip(flags, ports) for item in (flag, str(port))],
        "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    if object_store_memory:
        command += ["--object-store-memory", str(object_store_memory)]
    child_env = dict(os.environ)
    # the job entrypoint runs `python -m …`: make that the same interpreter as ours
    child_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}"
    child_env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    # on SIGTERM Ray would first drain the node (up to a minute, for Serve upgrades on k8s):
    # a local node has nobody to hand work over to
    child_env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # DeepSpeed JIT-compiles an op on first use (~45-90 s): the workers use gptctl's cache
    child_env.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())  # one per venv, as the controller
    for name, value in PROXY_CALLBACK_ENV.items():  # a clear 503 when a replica dies mid-request
        child_env.setdefault(name, value)
    child_env.pop("RAY_ADDRESS", None)
    child_env.update(env or {})
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env, start_new_session=True)
    finally:
        if log_path:
            log.close()


def start_ray_head(
    temp_dir: str | Path | None = None,
    num_cpus: int = 4,
    object_store_memory: int | None = 256 * 1024 * 1024,
    host: str = "127.0.0.1",
    gcs_port: int | None = None,
    dashboard_port: int | None = None,
    client_port: int | None = None,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
    detach: bool = False,
    timeout: float = 90.0,
) -> RayHead:
    """`ray start --head --block` on `host` with free ports; returns once the Jobs API answers.

    `detach=True` puts the head in its own session and does not stop it at interpreter exit
    (the local stack keeps it running after `gptctl stack up` returns). The temp dir must be
    short (Ray's unix sockets live under it); default: a fresh /tmp/rh_XXXXXX.
    """
    temp_dir = str(temp_dir or tempfile.mkdtemp(prefix="rh_", dir="/tmp"))
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    spare = iter(free_ports(3, host))
    gcs_port, dashboard_port, client_port = (port or next(spare) for port in (gcs_port, dashboard_port, client_port))
    # one node and no autoscaler: a job asking for more than it has is refused, not left waiting
    # (orchestrator.ray_runtime.fixed_size_shortfall; Ray passes the head's env to job drivers)
    process = _spawn_ray_start(
        ["--head", "--port", str(gcs_port), "--include-dashboard", "true", "--dashboard-host", host,
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port)],
        host=host, num_cpus=num_cpus, temp_dir=temp_dir, object_store_memory=object_store_memory,
        log_path=log_path, env={FIXED_SIZE_ENV: "1", **(env or {})})
    import psutil

    head = RayHead(
        pid=process.pid, create_time=psutil.Process(process.pid).create_time(),
        gcs_address=f"{host}:{gcs_port}", dashboard_url=f"http://{host}:{dashboard_port}",
        client_address=f"ray://{host}:{client_port}", temp_dir=temp_dir,
        log_path=str(log_path) if log_path else None, process=process,
    )
    if not detach:
        atexit.register(head.stop)
    try:
        _wait_ready(head, timeout)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_ready(head: RayHead, timeout: float) -> None:
    """The dashboard answers and the Jobs API lists jobs (its agent is up)."""
    def ready() -> bool:
        if head.process is not None and head.process.poll() is not None:
            tail = Path(head.log_path).read_text(errors="replace")[-2000:] if head.log_path else ""
            raise RuntimeError(f"ray start exited with code {head.process.returncode}\n{tail}")
        return _http_ok(f"{head.dashboard_url}/api/version", 2) and _http_ok(f"{head.dashboard_url}/api/jobs/", 5)

    wait_until(ready, interval_s=0.5, timeout_s=timeout, give_up=lambda _: TimeoutError(
        f"Ray head at {head.dashboard_url} did not answer within {timeout:.0f} s"))


@dataclass
class RayWorkerNode(_RayStartProcess):
    """A worker node (`ray start --address HEAD --block`) joined to a head; stopped like the head."""

    pid: int
    create_time: float
    temp_dir: str
    resources: dict
    node_id: str = ""  # Ray's id for this node, known once its raylet has started
    env: dict = field(default_factory=dict)  # what it was started with on top of our environment
    log_path: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def wait_joined(self, head: RayHead, timeout: float = 120.0) -> None:
        """Until the head lists this node alive; stops the node and raises if it does not."""
        def joined() -> bool:
            if self.node_id and self.node_id in _alive_node_ids(head):
                return True
            self.node_id = self.node_id or _own_node_id(self.temp_dir)
            if self.process is not None and self.process.poll() is not None:
                tail = Path(self.log_path).read_text(errors="replace")[-2000:] if self.log_path else ""
                raise RuntimeError(f"ray start --address exited with code {self.process.returncode}\n{tail}")
            return False

        try:
            wait_until(joined, interval_s=0.5, timeout_s=timeout, give_up=lambda _: TimeoutError(
                f"the worker node did not join {head.gcs_address} within {timeout:.0f} s"))
        except BaseException:
            self.stop()
            raise

    def kill(self) -> list[int]:
        """Lose the node abruptly, as when its machine dies: SIGKILL its `ray start`, raylet, agents
        and workers at once (by PID: its process tree and its own session), with no drain and no
        goodbye to the GCS. Returns the PIDs signalled. For fault tests and benches."""
        import psutil

        atexit.unregister(self.stop)
        if not self.alive():
            return []
        root = psutil.Process(self.pid)
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = [root]
        tree.extend(_session_members(self.pid, exclude={p.pid for p in tree}))
        for process in tree:
            _signal(process, signal.SIGKILL)
        psutil.wait_procs(tree, timeout=5)
        self._reap()
        return [p.pid for p in tree]


def start_ray_worker(
    head: RayHead,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    temp_dir: str | Path | None = None,
    object_store_memory: int | None = 128 * 1024 * 1024,
    host: str = "127.0.0.1",
    log_path: str | Path | None = None,
    wait: bool = True,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> RayWorkerNode:
    """Join one more node (its own raylet, object store, agents, temp dir, free ports) to `head`;
    returns once the head lists it alive (`wait=False`: at once; call `wait_joined`). Several can
    run on one host, started together: a test cluster on loopback.

    `resources` are Ray custom resources, so a job can ask for a node of this kind
    (`cluster.resources_per_worker`). `env` is the node's environment on top of ours, e.g.
    RAY_SERVE_WORKER_PROXY_HTTP_PORT, so that the Serve proxies of nodes sharing a host bind
    distinct ports."""
    temp_dir = str(temp_dir or tempfile.mkdtemp(prefix="rw_", dir="/tmp"))
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    process = _spawn_ray_start(["--address", head.gcs_address, "--resources", json.dumps(resources or {})],
                               host=host, num_cpus=num_cpus, temp_dir=temp_dir,
                               object_store_memory=object_store_memory, log_path=log_path, env=env)
    import psutil

    node = RayWorkerNode(pid=process.pid, create_time=psutil.Process(process.pid).create_time(),
                         temp_dir=temp_dir, resources=dict(resources or {}), env=dict(env or {}),
                         log_path=str(log_path) if log_path else None, process=process)
    atexit.register(node.stop)
    if wait:
        node.wait_joined(head, timeout)
    return node


def _own_node_id(temp_dir: str) -> str:
    """The node id a raylet chose, from the port files it writes into its own temp dir
    (`session_latest/metrics_export_port_<node id>`); "" until they exist."""
    for path in Path(temp_dir, "session_latest").glob("metrics_export_port_*"):
        return path.name.rsplit("_", 1)[-1]
    return ""


def _alive_node_ids(head: RayHead) -> set[str]:
    """The head's alive nodes, from the dashboard's state API (no driver connection needed)."""
    try:
        with urllib.request.urlopen(f"{head.dashboard_url}/api/v0/nodes?limit=1000", timeout=5) as response:
            nodes = json.loads(response.read())["data"]["result"]["result"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return set()
    return {node["node_id"] for node in nodes if node.get("state") == "ALIVE"}


if __name__ == "__main__":  # manual check: python -m infra.ray_head
    started = time.monotonic()
    handle = start_ray_head(log_path="/tmp/ray_head_manual.log")
    print(json.dumps(handle.to_dict(), indent=2), f"ready in {time.monotonic() - started:.1f} s")
    input("press Enter to stop ")
    print("ended", handle.stop())
