"""`import deepspeed` for workers and spec checks, without the imports gptctl never needs."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def _not_importable(name: str) -> Iterator[None]:
    """`import name` fails inside the block unless the module is already loaded."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the import system's documented "not importable" marker
    try:
        yield
    finally:
        if sys.modules.get(name, "") is None:
            del sys.modules[name]


def import_deepspeed():
    """`import deepspeed`, without the MLflow import its autotuner module makes on the way.

    deepspeed.autotuning tries `import mlflow` at import time (~0.9 s) only to log autotuning
    experiments, which gptctl never runs; it catches the failure. A worker needs MLflow only on
    rank 0 and only after its first step, so this keeps ~0.9 s off every worker's start.
    """
    with _not_importable("mlflow"):
        import deepspeed
    return deepspeed
