"""Environment that a Ray node and gptctl's driver must agree on.

Here rather than in orchestrator/ because infra/ starts Ray nodes and imports nothing of gptctl;
orchestrator/ray_runtime.py reads the same names.
"""
from __future__ import annotations

import os
from pathlib import Path

# set in a cluster's environment to say it never grows (gptctl's local stack sets it on its head)
FIXED_SIZE_ENV = "GPTCTL_RAY_FIXED_SIZE"

# every Serve proxy on a node with this in its environment answers 503 (not a bare 500) for a
# request whose replica died holding it (orchestrator/serve/proxy_errors.py); set on each node
PROXY_CALLBACK_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "orchestrator.serve.proxy_errors:proxy_middlewares"}


def default_extensions_dir() -> str:
    """DeepSpeed JIT-compiles an op on first use (~30-45 s); keep the result between runs.

    One cache per Python environment: the build records the venv's include paths, so two
    venvs sharing a cache would keep rebuilding each other's op. For the same reason every
    process building into it must run the same `ninja` (see `_pin_ninja`)."""
    import hashlib
    import sys

    _pin_ninja()
    env_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gptctl" / "torch_extensions" / env_key)
    )


def _pin_ninja() -> None:
    """Put this environment's `ninja` (a DeepSpeed dependency) first on PATH, for us and the Ray
    processes that inherit our environment.

    torch builds the op with whichever `ninja` PATH finds first. A system ninja (1.11) and pip's
    (1.13) hash commands differently in the build log they share, so each takes the other's build
    for a changed one and rebuilds: a process started from an activated venv and one started as
    `.venv/bin/python` (no venv on PATH) rebuilt the op, ~30 s, every time they alternated."""
    import shutil
    import sys

    here = Path(sys.executable).parent
    ours = here / "ninja"
    first = shutil.which("ninja")
    if ours.exists() and (first is None or Path(first).parent != here):
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
