"""Helpers for tests/interop (a plain module: `conftest` is ambiguous across test folders)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from model import GPT, GPTConfig, GPTTokenizer, save_pretrained

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, world.",
    "Alice lives in Paris. Bob lives in Rome.",
    "Ünïcödé tëxt, 中文字符, emoji 🙂",
    "numbers 1234567890 and symbols <|> [] {} ()",
] * 10
TEXT = "Hello world, the quick fox lives in Paris 🙂"


def make_tokenizer(vocab_size: int = 300) -> GPTTokenizer:
    return GPTTokenizer.train(CORPUS, vocab_size=vocab_size)


def tiny_config(tokenizer: GPTTokenizer, bias: bool = True, **overrides) -> GPTConfig:
    padded = -(-tokenizer.vocab_size // 64) * 64
    return GPTConfig(**{"vocab_size": padded, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
                        "bias": bias, **overrides})


def make_model(config: GPTConfig, seed: int = 0, std: float = 0.3) -> GPT:
    """Large random weights, so outputs depend strongly on every parameter (and on context)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def make_checkpoint(directory: Path, tokenizer: GPTTokenizer, bias: bool = True, seed: int = 0) -> Path:
    config = tiny_config(tokenizer, bias=bias)
    save_pretrained(directory, make_model(config, seed=seed), config, tokenizer)
    return Path(directory)


def tensors_equal(a: Path, b: Path) -> bool:
    """Same keys, dtypes, shapes and bits."""
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


class Payload:
    """Unpickling this creates `marker`: proof that something ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_payload(path: Path, marker: Path, kind: str = "pickle") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch.save":
        torch.save({"module": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
