"""`gptctl stack up|down|status|env`: a persistent local stack on loopback.

Three services, each started in its own session with its PID recorded, its log and its data
under one state directory (default ./.gptctl/stack, or --state-dir / $GPTCTL_STACK_DIR):

  s3      s3rver 3.7.1 (npm; persists objects under <state>/s3/data, so data survives
          down/up). Installed on first use with `npm install --prefix ~/.cache/gptctl/s3rver`
          ($GPTCTL_S3RVER_DIR overrides). Credentials S3RVER / S3RVER. `--s3 moto` uses
          moto_server instead (in memory: nothing survives `down`).
  mlflow  `mlflow server`, sqlite backend <state>/mlflow/mlflow.db, artifacts proxied to
          s3://gptctl-mlflow/artifacts on the stack's S3.
  ray     a Ray head (`ray start --head --block`, infra/ray_head.py) with the dashboard / Jobs
          API, started with the stack's S3 and MLflow settings so jobs reach both.

<state>/stack.json keeps the ports (chosen free on the first `up`, reused afterwards so the
exported URLs stay valid); <state>/pids/<service>.json the PID and start time of each running
service; <state>/logs/<service>.log their output; <state>/env.sh the variables to export.
`up` starts only what is not running (twice is harmless); `down` stops exactly the processes
recorded in the pid files (and what they started), never anything else.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from infra.ray_head import RayHead, process_matches, start_ray_head, stop_process_tree
from infra.s3_endpoint import free_port, wait_http

DEFAULT_STATE_DIR = Path(".gptctl") / "stack"
SERVICES = ("s3", "mlflow", "ray")
S3RVER_VERSION = "3.7.1"
S3RVER_CREDENTIALS = ("S3RVER", "S3RVER")  # s3rver's built-in account
MOTO_CREDENTIALS = ("testing", "testing")
DATA_BUCKET, MLFLOW_BUCKET = "gptctl", "gptctl-mlflow"
HOST = "127.0.0.1"


class StackError(RuntimeError):
    """A service could not be started or installed (exit 1)."""


def state_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("GPTCTL_STACK_DIR") or DEFAULT_STATE_DIR).expanduser().resolve()


# ----------------------------------------------------------------------------- state files

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load_config(root: Path, s3_backend: str | None = None) -> dict:
    """Ports and paths of this stack; created (free ports) on the first `up`."""
    config = _read_json(root / "stack.json")
    if config is None:
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
        config = {
            "host": HOST,
            "s3_backend": s3_backend or "s3rver",
            # Ray's unix sockets live under its temp dir: keep it short, unique per state dir
            "ray_temp_dir": f"/tmp/gptctl-ray-{digest}",
            "ports": {name: free_port(HOST) for name in ("s3", "mlflow", "ray_gcs", "ray_dashboard", "ray_client")},
        }
    if s3_backend:
        config["s3_backend"] = s3_backend
    return config


def _pid_file(root: Path, service: str) -> Path:
    return root / "pids" / f"{service}.json"


def _record(root: Path, service: str) -> dict | None:
    return _read_json(_pid_file(root, service))


def _running(record: dict | None) -> bool:
    return bool(record) and process_matches(int(record["pid"]), record.get("create_time"))


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # like the servers themselves: a port whose old connections linger in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def _lock(root: Path):
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- URLs and env

def urls(config: dict) -> dict[str, str]:
    ports, host = config["ports"], config["host"]
    return {
        "s3": f"http://{host}:{ports['s3']}",
        "mlflow": f"http://{host}:{ports['mlflow']}",
        "ray": f"http://{host}:{ports['ray_dashboard']}",
        "ray_gcs": f"{host}:{ports['ray_gcs']}",
        "ray_client": f"ray://{host}:{ports['ray_client']}",
    }


def stack_env(config: dict) -> dict[str, str]:
    """What a shell (and every job) needs to use this stack."""
    url = urls(config)
    key, secret = S3RVER_CREDENTIALS if config["s3_backend"] == "s3rver" else MOTO_CREDENTIALS
    return {
        "AWS_ENDPOINT_URL": url["s3"],
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        # s3rver stores aws-chunked bodies verbatim: ask boto3/pyarrow for plain uploads
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "MLFLOW_TRACKING_URI": url["mlflow"],
        # ray.init / `gptctl submit` without --address join the stack's cluster (GCS address);
        # the Jobs API (`gptctl submit --address …`, `gptctl status|logs|list`, `ray job …`) is the dashboard
        "RAY_ADDRESS": url["ray_gcs"],
        "RAY_API_SERVER_ADDRESS": url["ray"],
        "RAY_AUTH_MODE": "disabled",
    }


def env_script(config: dict) -> str:
    return "".join(f"export {key}={value}\n" for key, value in stack_env(config).items())


# ----------------------------------------------------------------------------- health

def _http_status(url: str, timeout: float = 2.0) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def healthy(service: str, config: dict) -> bool:
    url = urls(config)
    if service == "s3":
        return _http_status(url["s3"] + "/") is not None  # any S3 answer (403 without credentials)
    if service == "mlflow":
        return _http_status(url["mlflow"] + "/health") == 200
    return _http_status(url["ray"] + "/api/version") == 200


# ----------------------------------------------------------------------------- starting

def s3rver_script(install: bool = True, out: Callable[[str], Any] = print) -> list[str]:
    """The command that runs s3rver; installs it with npm on first use."""
    node = shutil.which("node")
    if not node:
        raise StackError("node is not installed: the persistent S3 endpoint (s3rver) needs Node.js ≥ 16; "
                         "or use `gptctl stack up --s3 moto` (in memory)")
    prefix = Path(os.environ.get("GPTCTL_S3RVER_DIR") or Path.home() / ".cache" / "gptctl" / "s3rver").expanduser()
    script = prefix / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not script.is_file():
        npm = shutil.which("npm")
        if not install or not npm:
            raise StackError(f"s3rver is not installed under {prefix} and npm is not available")
        out(f"[stack] installing s3rver@{S3RVER_VERSION} into {prefix} (npm, once)")
        prefix.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([npm, "install", "--prefix", str(prefix), f"s3rver@{S3RVER_VERSION}", "--no-audit",
                               "--no-fund", "--loglevel", "error"], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not script.is_file():
            raise StackError(f"npm install s3rver@{S3RVER_VERSION} failed:\n{done.stdout}{done.stderr}")
    return [node, str(script)]


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> dict:
    """Start a service in its own session (it outlives this CLI; `down` ends its whole group)."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    return {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time(),
            "command": command, "log": str(log_path), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "_process": process}


def _wait(record: dict, url: str, timeout: float) -> None:
    try:
        wait_http(url, timeout, record.get("_process"))
    except (RuntimeError, TimeoutError) as error:
        tail = Path(record["log"]).read_text(errors="replace")[-1500:]
        raise StackError(f"{error}\n--- {record['log']} (tail) ---\n{tail}") from None


def _save_record(root: Path, service: str, record: dict) -> None:
    _write_json(_pid_file(root, service), {k: v for k, v in record.items() if not k.startswith("_")})


def _ensure_port(config: dict, name: str, out: Callable[[str], Any]) -> None:
    if not _port_free(config["ports"][name]):
        new = free_port(HOST)
        out(f"[stack] port {config['ports'][name]} ({name}) is taken by another program; using {new}")
        config["ports"][name] = new


def _start_s3(root: Path, config: dict, out: Callable[[str], Any]) -> dict:
    _ensure_port(config, "s3", out)
    port = str(config["ports"]["s3"])
    env = dict(os.environ)
    if config["s3_backend"] == "moto":
        from infra.s3_endpoint import _moto_server_cmd

        command = [*_moto_server_cmd(), "-H", HOST, "-p", port]
        out("[stack] warning: moto_server keeps objects in memory; they are lost on `stack down`")
    else:
        data = root / "s3" / "data"
        data.mkdir(parents=True, exist_ok=True)
        command = [*s3rver_script(out=out), "-d", str(data), "-a", HOST, "-p", port, "--silent"]
        env["NODE_OPTIONS"] = (env.get("NODE_OPTIONS", "") + " --openssl-legacy-provider").strip()
    return _spawn(command, root / "logs" / "s3.log", env)


def _create_buckets(config: dict) -> None:
    from infra.s3_endpoint import patched_environ
    from workers import storage

    with patched_environ(stack_env(config)):
        for bucket in (DATA_BUCKET, MLFLOW_BUCKET):
            storage.ensure_bucket(f"s3://{bucket}")


def _start_mlflow(root: Path, config: dict, out: Callable[[str], Any]) -> dict:
    _ensure_port(config, "mlflow", out)
    env = dict(os.environ)
    env.update(stack_env(config))
    env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_S3_ENDPOINT_URL": urls(config)["s3"]})
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
               "--host", HOST, "--port", str(config["ports"]["mlflow"]), "--workers", "1"]
    return _spawn(command, root / "logs" / "mlflow.log", env)


def _start_ray(root: Path, config: dict, out: Callable[[str], Any], num_cpus: int | None) -> dict:
    for name in ("ray_gcs", "ray_dashboard", "ray_client"):
        _ensure_port(config, name, out)
    env = stack_env(config)
    env.pop("RAY_ADDRESS")
    env.pop("RAY_API_SERVER_ADDRESS")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    ports = config["ports"]
    try:
        head = start_ray_head(
            temp_dir=config["ray_temp_dir"], num_cpus=num_cpus or max(os.cpu_count() or 1, 4),
            object_store_memory=1024 ** 3, gcs_port=ports["ray_gcs"], dashboard_port=ports["ray_dashboard"],
            client_port=ports["ray_client"], log_path=root / "logs" / "ray.log", env=env, detach=True,
        )
    except (RuntimeError, TimeoutError) as error:
        raise StackError(f"the Ray head did not start: {error}") from None
    return {**head.to_dict(), "log": str(root / "logs" / "ray.log"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def up(path: str | Path | None = None, services: tuple[str, ...] = SERVICES, s3_backend: str | None = None,
       num_cpus: int | None = None, out: Callable[[str], Any] = print) -> dict:
    """Start what is not running yet; returns status()."""
    root = state_dir(path)
    with _lock(root):
        config = load_config(root, s3_backend)
        url = urls(config)
        _write_json(root / "stack.json", config)
        started: dict[str, dict] = {}
        if "s3" in services:
            if _running(_record(root, "s3")):
                out(f"[stack] s3      already running at {url['s3']}")
            else:
                record = _start_s3(root, config, out)
                _write_json(root / "stack.json", config)
                url = urls(config)
                _save_record(root, "s3", {**record, "url": url["s3"]})  # before waiting: `down` can stop it
                _wait(record, url["s3"], 60)
                out(f"[stack] s3      started at {url['s3']} (pid {record['pid']}, data {root / 's3' / 'data'})")
        if "s3" in services or "mlflow" in services:
            if healthy("s3", config):
                _create_buckets(config)
        if "mlflow" in services:
            if _running(_record(root, "mlflow")):
                out(f"[stack] mlflow  already running at {url['mlflow']}")
            else:
                started["mlflow"] = _start_mlflow(root, config, out)  # comes up while Ray starts
                _write_json(root / "stack.json", config)
                url = urls(config)
                _save_record(root, "mlflow", {**started["mlflow"], "url": url["mlflow"]})
        if "ray" in services:
            if _running(_record(root, "ray")):
                out(f"[stack] ray     already running at {url['ray']}")
            else:
                record = _start_ray(root, config, out, num_cpus)
                _save_record(root, "ray", {**record, "url": url["ray"]})
                out(f"[stack] ray     started at {url['ray']} (GCS {url['ray_gcs']}, pid {record['pid']})")
        if "mlflow" in started:
            record = started["mlflow"]
            _wait(record, url["mlflow"] + "/health", 180)
            out(f"[stack] mlflow  started at {url['mlflow']} (pid {record['pid']})")
        _write_json(root / "stack.json", config)
        (root / "env.sh").write_text(env_script(config))
    return status(root)


def down(path: str | Path | None = None, services: tuple[str, ...] = SERVICES,
         out: Callable[[str], Any] = print) -> list[int]:
    """Stop the services recorded in the pid files (and every process they started)."""
    root = state_dir(path)
    ended: list[int] = []
    with _lock(root):
        for service in reversed(SERVICES):
            if service not in services:
                continue
            record = _record(root, service)
            if not record:
                out(f"[stack] {service:<7} not running")
                continue
            if _running(record):
                if service == "ray":
                    pids = RayHead.from_dict(record).stop()
                else:
                    pids = stop_process_tree(int(record["pid"]), record.get("create_time"), timeout=20, session=True)
                ended.extend(pids)
                out(f"[stack] {service:<7} stopped (pid {record['pid']})")
            else:
                out(f"[stack] {service:<7} was not running (stale pid file removed)")
            _pid_file(root, service).unlink(missing_ok=True)
    return ended


def status(path: str | Path | None = None) -> dict:
    """Each service's URL, PID, whether it runs and answers; the env to export."""
    root = state_dir(path)
    config = _read_json(root / "stack.json")
    if config is None:
        return {"state_dir": str(root), "services": {}, "env": {}, "up": False}
    url = urls(config)
    services = {}
    for service in SERVICES:
        record = _record(root, service)
        running = _running(record)
        services[service] = {"url": url[service], "running": running, "healthy": running and healthy(service, config),
                             "pid": record.get("pid") if record else None,
                             "log": str(root / "logs" / f"{service}.log")}
    services["ray"]["gcs"] = url["ray_gcs"]
    return {"state_dir": str(root), "services": services, "env": stack_env(config),
            "up": all(s["healthy"] for s in services.values()), "s3_backend": config["s3_backend"],
            "ray_logs": str(Path(config["ray_temp_dir"]) / "session_latest" / "logs")}


def format_status(info: dict) -> str:
    if not info["services"]:
        return f"stack at {info['state_dir']}: not set up (run `gptctl stack up`)"
    lines = [f"stack at {info['state_dir']}"]
    for name, service in info["services"].items():
        state = "healthy" if service["healthy"] else ("running, not answering" if service["running"] else "stopped")
        extra = f"  (GCS {service['gcs']})" if name == "ray" else ""
        pid = f"pid {service['pid']}" if service["running"] else ""
        lines.append(f"  {name:<7} {state:<24} {service['url']}{extra}  {pid}".rstrip())
    lines.append(f"  logs    {info['state_dir']}/logs/  (Ray: {info['ray_logs']})")
    lines.append("")
    lines.append(f"# use it from a shell:  eval \"$(gptctl stack env --state-dir {info['state_dir']})\"")
    lines.extend(f"export {key}={value}" for key, value in info["env"].items())
    return "\n".join(lines)


def running_dashboard_url(path: str | Path | None = None) -> str | None:
    """The Jobs API URL of a running local stack, if any (jobs commands fall back to it)."""
    root = state_dir(path)
    config = _read_json(root / "stack.json")
    if config is None or not _running(_record(root, "ray")):
        return None
    return urls(config)["ray"]
