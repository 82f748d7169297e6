"""Helpers for tests/serve (a plain module: `conftest` is ambiguous across test folders)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model import GPT, GPTConfig, GPTTokenizer, save_pretrained

TEXTS = [
    "Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo.",
    "Where does Alice live?\n### Response:\nParis",
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 中文, 🙂",
] * 20
API_KEY_VAR = "GPTCTL_TEST_SERVE_KEY"
API_KEY = "test-key-7c1e0a"


def make_checkpoint(directory: Path, tokenizer: GPTTokenizer, seed: int = 0, block_size: int = 1024,
                    n_embd: int = 32, kind: str = "finetune") -> Path:
    """Random weights (std 0.3, so the output depends on the context) saved as a real checkpoint."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=n_embd)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_pretrained(directory, model, config, tokenizer)
    (Path(directory) / "trainer_state.json").write_text(json.dumps({"kind": kind, "step": 1}))
    return Path(directory)


def deploy_app(**fields) -> str:
    from infra.s3_endpoint import free_port
    from orchestrator.serve.deploy import deploy
    from orchestrator.spec import parse_spec

    return deploy(parse_spec({"kind": "deploy", "port": free_port(), "cpus_per_replica": 0.25, **fields}))
