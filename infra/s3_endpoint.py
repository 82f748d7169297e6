"""Start a loopback S3 endpoint (``moto_server``) for tests and the local demo.

moto is a real S3 HTTP API, up in well under a second, in memory only: nothing survives a
restart, which is what tests want. The handle stops exactly the process it started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.waiting import wait_until

__all__ = ["ServiceHandle", "free_port", "patched_environ", "pointed_at", "start_moto_server", "wait_http"]


@dataclass
class ServiceHandle:
    """A started service: its PID, base URL, and a ``stop()`` that ends only that PID."""

    pid: int
    url: str
    process: subprocess.Popen = field(repr=False)
    log_path: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        atexit.unregister(self.stop)

    def __enter__(self) -> "ServiceHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to port 0)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: all are held open until each is chosen, since ports picked
    one at a time may repeat (Ray refuses a node whose components share a port)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers any HTTP status; fail early if ``process`` exits."""

    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # an HTTP error status still means the server is up
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"service for {url} exited with code {process.returncode} before answering")
        return False

    wait_until(answers, interval_s=0.1, timeout_s=timeout,
               give_up=lambda _: TimeoutError(f"service at {url} did not answer within {timeout:.0f} s"))


def _moto_server_cmd() -> list[str]:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


def start_moto_server(
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | Path | None = None,
    timeout: float = 30.0,
) -> ServiceHandle:
    """Start ``moto_server -H host -p port`` and return once it answers HTTP.

    Point boto3 at it with ``AWS_ENDPOINT_URL=handle.url`` (any credentials work).
    """
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [*_moto_server_cmd(), "-H", host, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if log_path:
            log.close()
    handle = ServiceHandle(pid=process.pid, url=url, process=process, log_path=Path(log_path) if log_path else None)
    atexit.register(handle.stop)  # never leave an orphan if the caller forgets
    try:
        wait_http(url, timeout, process)
    except BaseException:
        handle.stop()
        raise
    return handle


TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def patched_environ(values: dict[str, str]):
    """Set environment variables for the duration of a block, then restore what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def pointed_at(endpoint_url: str, credentials: dict[str, str] = TEST_CREDENTIALS):
    """Point boto3/pyarrow (AWS_ENDPOINT_URL + credentials) at an endpoint; restore on exit."""
    with patched_environ({**credentials, "AWS_ENDPOINT_URL": endpoint_url}):
        yield endpoint_url
