"""Model hyper-parameters: the single source of truth for the shape of a GPT.

Kept free of torch imports so that orchestration code can read, validate and
cost a config (e.g. FLOPs for MFU) without loading the deep-learning stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class GPTConfig:
    """Shape of a GPT-2 style decoder. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50304  # 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024  # max context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside a forward pass.
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (what config.json stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of to_dict; unknown keys are an error so typos never pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown GPTConfig key(s): {', '.join(unknown)} (valid: {', '.join(sorted(known))})"
            )
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def config_from_preset(name: str, **overrides: Any) -> GPTConfig:
    """Build a config from a named preset; overrides win (e.g. vocab_size of a trained tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name], **overrides})


def _count_parameters(config: GPTConfig, exclude_embeddings: bool = False) -> int:
    """Parameter count from the config alone (matches GPT.num_parameters, tied LM head counted once)."""
    d, L = config.n_embd, config.n_layer
    ln = 2 * d if config.bias else d
    b = 1 if config.bias else 0
    per_layer = (
        ln  # ln_1
        + (3 * d * d + b * 3 * d)  # qkv projection
        + (d * d + b * d)  # attention output projection
        + ln  # ln_2
        + (4 * d * d + b * 4 * d)  # MLP up
        + (4 * d * d + b * d)  # MLP down
    )
    total = L * per_layer + ln  # + final LayerNorm
    if not exclude_embeddings:
        total += config.vocab_size * d + config.block_size * d
    return total


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6*N + 12*L*H*Q*T.

    N counts every weight a token is multiplied by: the non-embedding parameters plus the
    LM head (tied to the token embedding, but still a vocab x n_embd matmul per token);
    the position/token lookups are free. H*Q == n_embd, so the second term is the
    attention-score/value work that grows with the context length seq_len.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = _count_parameters(config, exclude_embeddings=True) + config.vocab_size * config.n_embd
    return float(6 * n + 12 * config.n_layer * config.n_embd * seq_len)
