"""`gptctl stack up|down|status`: S3 (s3rver, persistent) + MLflow server + Ray head with pid
files; up twice is harmless; data survives down/up; down leaves no process behind."""
from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest

from orchestrator import stack

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not (shutil.which("node") and (shutil.which("npm") or os.environ.get(
    "GPTCTL_S3RVER_DIR"))), reason="the persistent S3 server (s3rver) needs Node.js")]


def _descendants(root) -> set[int]:
    """Every process the stack's recorded PIDs own: their trees and their sessions."""
    pids: set[int] = set()
    for service in stack.SERVICES:
        record = json.loads((root / "pids" / f"{service}.json").read_text())
        process = psutil.Process(record["pid"])
        pids |= {process.pid, *(child.pid for child in process.children(recursive=True))}
        for other in psutil.process_iter():
            try:
                if os.getsid(other.pid) == record["pid"]:
                    pids.add(other.pid)
            except OSError:
                continue
    return pids


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _s3_env(monkeypatch, info: dict) -> None:
    for key, value in info["env"].items():
        monkeypatch.setenv(key, value)


def test_stack_up_twice_persist_down(gptctl, tmp_path, monkeypatch):
    root = tmp_path / "stack"
    started = False
    try:
        code, out, err = gptctl("stack", "up", "--state-dir", root)
        started = True
        assert code == 0, out + err
        for service in ("s3", "mlflow", "ray"):
            assert f"[stack] {service:<7} started" in out
        pids = {s: json.loads((root / "pids" / f"{s}.json").read_text())["pid"] for s in stack.SERVICES}

        code, out, _ = gptctl("stack", "up", "--state-dir", root)
        assert code == 0 and out.count("already running") == 3, out
        assert pids == {s: json.loads((root / "pids" / f"{s}.json").read_text())["pid"] for s in stack.SERVICES}

        code, out, _ = gptctl("stack", "status", "--state-dir", root)
        assert code == 0 and out.count("healthy") == 3
        info = stack.status(root)
        for name in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            assert f"export {name}={info['env'][name]}" in out
        assert info["env"]["RAY_API_SERVER_ADDRESS"] == info["services"]["ray"]["url"]
        assert info["env"]["RAY_ADDRESS"] == info["services"]["ray"]["gcs"]
        code, env_out, _ = gptctl("stack", "env", "--state-dir", root)
        assert code == 0 and env_out == (root / "env.sh").read_text()

        _s3_env(monkeypatch, info)
        from workers import storage

        storage.write_text("s3://gptctl/persist/hello.txt", "still here")
        import httpx

        assert httpx.get(f"{info['services']['mlflow']['url']}/health", timeout=10).status_code == 200
        assert httpx.get(f"{info['env']['RAY_API_SERVER_ADDRESS']}/api/version", timeout=10).status_code == 200

        owned = _descendants(root)
        code, out, _ = gptctl("stack", "down", "--state-dir", root)
        assert code == 0 and out.count("stopped") == 3
        assert not _alive(owned), "down leaves no process behind"
        assert not list((root / "pids").glob("*.json"))
        code, out, _ = gptctl("stack", "status", "--state-dir", root)
        assert code == 1 and out.count("stopped") == 3

        code, out, err = gptctl("stack", "up", "--state-dir", root, "--services", "s3")
        assert code == 0, out + err
        assert stack.status(root)["env"]["AWS_ENDPOINT_URL"] == info["env"]["AWS_ENDPOINT_URL"], "same port again"
        assert storage.read_text("s3://gptctl/persist/hello.txt") == "still here"
    finally:
        if started:
            record = root / "pids" / "s3.json"
            owned = {json.loads(record.read_text())["pid"]} if record.exists() else set()
            gptctl("stack", "down", "--state-dir", root)
            assert not _alive(owned)
            config = json.loads((root / "stack.json").read_text())
            shutil.rmtree(config["ray_temp_dir"], ignore_errors=True)  # Ray's logs of this test's head
