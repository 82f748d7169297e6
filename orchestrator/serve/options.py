"""What one Serve replica is configured with: limits, batching and auth (no Ray imports).

`deployment.py` builds a `ServeOptions` from the DeploySpec and hands it to every replica as a plain
dict. The API key itself never travels: only its SHA-256, which the replica compares with the
SHA-256 of the bearer token a request presents.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass
class ServeOptions:
    model_id: str = "gptctl"  # the `model` name clients pass and /v1/models lists
    max_context: int | None = None  # prompt + completion tokens; None: the model's block_size
    max_tokens_limit: int | None = None  # largest max_tokens a /v1 request may ask for; None: the context
    default_max_tokens: int = 16  # /v1/completions default (OpenAI's); chat defaults to all that fits
    max_choices: int = 16  # prompts x n per request
    max_request_bytes: int = 1_048_576
    max_batch_size: int = 32  # sequences decoded together per forward pass
    prefill_token_budget: int = 2048  # prompt tokens prefilled between two decode steps
    batch_invariant: bool = True  # a request's tokens never depend on the rest of the batch
    num_threads: int = 1  # torch intra-op threads in the replica
    device: str = "cpu"  # "cuda" when the replica was given a GPU
    api_key_sha256: str | None = None  # hex digest; None: no auth

    def __post_init__(self) -> None:
        for name in ("max_choices", "max_request_bytes", "max_batch_size", "prefill_token_budget",
                     "num_threads", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServeOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data or {}) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s): {', '.join(unknown)}")
        return cls(**(data or {}))


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_matches(authorization: str | None, key_sha256: str) -> bool:
    """True when the Authorization header is `Bearer <key>` for the configured key."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return hmac.compare_digest(hash_api_key(token.strip()), key_sha256)
