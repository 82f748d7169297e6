"""Tiny-model and corpus helpers for tests/model (a plain module: `conftest` is ambiguous
when several test folders each have one)."""

from __future__ import annotations

import torch

from model import GPT, GPTConfig

VOCAB = 101


def make_model(block_size: int = 32, bias: bool = True, seed: int = 0, std: float = 0.5) -> GPT:
    """A float64 tiny GPT with large random weights.

    GPT-2 init makes a tiny model nearly uniform and repetitive; large weights make its
    outputs depend strongly on context, so equality tests actually exercise attention.
    float64 keeps cached vs. recomputed logits from flipping near-tied argmaxes.
    """
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32, bias=bias
    )
    model = GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, world.",
    "def main():\n    return 0\n",
    "Ünïcödé tëxt, 中文字符, 日本語のテキスト, emoji 🙂🚀",
    "  leading spaces and\ttabs\r\n",
    "numbers 1234567890 and symbols <|> [] {} ()",
] * 20
