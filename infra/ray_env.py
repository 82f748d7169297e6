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
    """DeepSpeed JIT-compiles an op on first use (~45 s); keep the result between runs.

    One cache per Python environment: the build records the venv's include paths, so two
    venvs sharing a cache would keep rebuilding each other's op."""
    import hashlib
    import sys

    env_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gptctl" / "torch_extensions" / env_key)
    )
