"""Fixtures for tests/serve: tiny checkpoints, and Serve apps deployed once per session on the
session's embedded Ray (the `ray_cluster` fixture), each under its own route prefix."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_testutil import API_KEY, API_KEY_VAR, TEXTS, deploy_app, make_checkpoint

from model import GPTTokenizer


@pytest.fixture(scope="session")
def serve_tokenizer() -> GPTTokenizer:
    return GPTTokenizer.train(TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def serve_checkpoints(tmp_path_factory, serve_tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-ckpt")
    return [make_checkpoint(root / f"ckpt{i}", serve_tokenizer, seed=i) for i in range(2)]


@pytest.fixture(scope="session")
def serve_url(ray_cluster, serve_checkpoints) -> str:
    """The main app: no auth, the model's full 1024-token context, batches of up to 16."""
    return deploy_app(name="t-serve", checkpoint=str(serve_checkpoints[0]), route_prefix="/t-serve",
                      max_batch_size=16, max_request_bytes=65536)


@pytest.fixture(scope="session")
def auth_app(ray_cluster, serve_checkpoints) -> dict:
    """A second app with an API key (from an environment variable) and a 64-token context."""
    os.environ[API_KEY_VAR] = API_KEY
    spec = dict(name="t-auth", checkpoint=str(serve_checkpoints[0]), route_prefix="/t-auth",
                api_key_env=API_KEY_VAR, max_context=64, max_tokens_limit=32)
    return {"url": deploy_app(**spec), "key": API_KEY, "spec": spec}
