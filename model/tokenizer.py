"""Byte-level BPE tokenizer (HF `tokenizers`), with GPT-2's byte-to-unicode mapping.

Every byte is in the base alphabet, so any string encodes without an unknown token and
decodes back exactly. Special tokens are never produced from user text: a literal
"<|endoftext|>" typed by a user is plain text, not an end-of-document marker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
_N_BYTES = 256


class GPTTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a HF Tokenizer; prefer train/load/from_str, which build a valid one."""
        # Not stored in tokenizer.json, so it is (re)applied on every construction path.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s): {', '.join(missing)}")
        self.eos_id: int = ids[EOS_TOKEN]
        self.pad_id: int = ids[PAD_TOKEN]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> GPTTokenizer:
        """Learn BPE merges from texts; vocab_size counts the 256 bytes and the special tokens."""
        minimum = _N_BYTES + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be >= {minimum} (256 bytes + special tokens), got {vocab_size}"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> GPTTokenizer:
        """Load a tokenizer.json file, or a directory that contains one."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        return cls.from_str(file.read_text(encoding="utf-8"))

    @classmethod
    def from_str(cls, json_text: str) -> GPTTokenizer:
        return cls(Tokenizer.from_str(json_text))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json to path, or into path if it is an existing directory."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(self.to_str(), encoding="utf-8")

    def to_str(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        """Token ids of text as plain text: no special tokens added or recognised."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Exact inverse of encode; pad tokens are dropped, the eos token is kept as its text."""
        kept = [int(i) for i in ids if int(i) != self.pad_id]
        return self._tok.decode(kept, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Fingerprint that ties a dataset or checkpoint to the exact tokenizer that produced it."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"GPTTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"
