"""Turning one position's logits into one token id (temperature, top-k, nucleus)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: draw from torch's global RNG
    stop_token_ids: tuple[int, ...] = ()  # e.g. (eos_id,); the stop token itself is not returned

    def __post_init__(self) -> None:
        # Reject nonsense up front so a serving request fails with a message, not a NaN.
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator | None:
    """A private CPU generator, so seeded results ignore (and leave alone) the global RNG."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sample_next_token(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from logits [V].

    Sampling runs on CPU in fp32: the CPU generator stays device-independent, so a seed
    gives the same tokens wherever the model ran.
    """
    if logits.dim() != 1:
        raise ValueError(f"expected logits of shape [V], got {tuple(logits.shape)}")
    if params.greedy:
        return int(torch.argmax(logits).item())

    logits = logits.detach().float().cpu() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A token survives if the mass before it is still short of top_p; the top token always does.
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()
