"""``gptctl data prepare``: text corpus -> tokenizer + packed WebDataset shards + manifest.

Inputs (local paths or ``s3://`` URIs; directories are searched recursively, sorted):

* ``.txt``: documents are separated by empty (or whitespace-only) lines; the lines of one
  document are joined with ``\\n``.
* ``.jsonl``: one JSON object per line (blank lines skipped). ``{"text": ...}`` is pre-training
  data; ``{"prompt": ..., "response": ...}`` is fine-tuning data. One dataset holds one kind.

Validation split rule (documents for pre-training, examples for fine-tuning): items are put in
the order of ``numpy.random.default_rng(seed).permutation(n)``; the first
``round(val_fraction * n)`` of that order go to val, at least 1 when ``n >= 2`` and
``val_fraction > 0``, never all of them. For pre-training, if those documents hold less than
one row (``seq_len + 1`` tokens) while the corpus holds at least two rows' worth, further
documents in the same order move to val until val holds a row (train keeps at least one).
A trained tokenizer learns only from the documents outside the first (count-based) val set.

Pre-training rows: each split's documents, in corpus order, are encoded, each followed by eos,
concatenated, and cut into rows of ``seq_len + 1`` tokens (stride ``seq_len + 1``); the final
partial row is dropped. Fine-tuning rows: one example per row, ``format_prompt(prompt)`` then
the response then eos, right-padded with pad; the loss mask is 1 on response tokens and eos.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from model.tokenizer import GPTTokenizer
from workers import storage
from workers.json_input import json_object
from workers.shards import MANIFEST_NAME, TOKENIZER_NAME, Manifest, ShardWriter, token_dtype

__all__ = [
    "PROMPT_TEMPLATE",
    "RESPONSE_MARKER",
    "DataError",
    "Document",
    "Example",
    "format_prompt",
    "expand_inputs",
    "load_corpus",
    "choose_val",
    "finetune_row",
    "prepare_dataset",
    "ENGINES",
]

RESPONSE_MARKER = "\n### Response:\n"
PROMPT_TEMPLATE = "{prompt}" + RESPONSE_MARKER
"""Fine-tuning rows are ``format_prompt(prompt) + response + eos``; serving must prompt the same way."""

INPUT_SUFFIXES = (".txt", ".jsonl")
_ENCODE_CHUNK = 512


def format_prompt(prompt: str) -> str:
    """The text a fine-tuned model sees before its response (shared with serving)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what was expected."""


@dataclass
class Document:
    """One pre-training document and where it came from (``file:line``)."""

    text: str
    source: str


@dataclass
class Example:
    """One fine-tuning prompt/response pair and where it came from (``file:line``)."""

    prompt: str
    response: str
    source: str


# --------------------------------------------------------------------------- reading


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files to read, in order: explicit files as given, directories' .txt/.jsonl files sorted."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given (expected .txt/.jsonl files or directories of them)")
    files: list[str] = []
    for raw in inputs:
        uri = os.fspath(raw)
        if not storage.exists(uri):
            raise DataError(f"input not found: {uri} (expected a .txt/.jsonl file or a directory of them)")
        found = storage.list_files(uri)
        if found == [uri]:
            if not uri.endswith(INPUT_SUFFIXES):
                raise DataError(f"input {uri}: unsupported file type (expected .txt or .jsonl)")
            files.append(uri)
            continue
        found = [f for f in found if f.endswith(INPUT_SUFFIXES) and not os.path.basename(f).startswith(".")]
        if not found:
            raise DataError(f"input {uri}: no .txt or .jsonl files found under it")
        files.extend(found)
    return files


def _read_text(uri: str) -> str:
    try:
        return storage.read_text(uri)
    except storage.StorageError as exc:
        raise DataError(f"cannot read input {uri}: {exc}") from exc


def _txt_documents(uri: str) -> Iterator[Document]:
    lines: list[str] = []
    start = 1
    for lineno, line in enumerate(_read_text(uri).splitlines(), start=1):
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            yield Document("\n".join(lines), f"{uri}:{start}")
            lines = []
    if lines:
        yield Document("\n".join(lines), f"{uri}:{start}")


def _jsonl_records(uri: str) -> Iterator[Document | Example]:
    for lineno, line in enumerate(_read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri}:{lineno}"
        record = json_object(line, where, DataError, expected="one JSON object per line")
        if "prompt" in record and "response" in record:
            prompt, response = record["prompt"], record["response"]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"{where}: \"prompt\" and \"response\" must be strings")
            yield Example(prompt, response, where)
        elif "text" in record:
            if not isinstance(record["text"], str):
                raise DataError(f"{where}: \"text\" must be a string, got {type(record['text']).__name__}")
            yield Document(record["text"], where)
        else:
            raise DataError(
                f"{where}: expected a record with \"text\" (pre-training) or \"prompt\" and \"response\" "
                f"(fine-tuning), got keys {sorted(record)}"
            )


def load_corpus(inputs: Sequence[str | os.PathLike]) -> tuple[str, list[Document] | list[Example]]:
    """Read every input; returns ``(kind, items)`` with kind ``"pretrain"`` or ``"finetune"``."""
    items: list = []
    kind = first = None
    for uri in expand_inputs(inputs):
        records = _txt_documents(uri) if uri.endswith(".txt") else _jsonl_records(uri)
        for item in records:
            item_kind = "finetune" if isinstance(item, Example) else "pretrain"
            if kind is None:
                kind, first = item_kind, item.source
            elif item_kind != kind:
                raise DataError(
                    f"{item.source}: {item_kind} record, but {first} is {kind} data; "
                    "one dataset holds either pre-training text or prompt/response pairs, not both"
                )
            items.append(item)
    if not items:
        raise DataError(f"no documents found in inputs {[os.fspath(i) for i in inputs]}")
    return kind, items


# --------------------------------------------------------------------------- splitting


def choose_val(
    n_items: int,
    val_fraction: float,
    seed: int,
    token_counts: Sequence[int] | None = None,
    row_len: int | None = None,
) -> np.ndarray:
    """Boolean mask of the items that go to val (the rule is in the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    is_val = np.zeros(n_items, dtype=bool)
    if n_items < 2 or val_fraction == 0.0:
        return is_val
    order = np.random.default_rng(seed).permutation(n_items)
    n_val = min(max(1, round(val_fraction * n_items)), n_items - 1)
    is_val[order[:n_val]] = True
    if token_counts is not None and row_len is not None:
        counts = np.asarray(token_counts, dtype=np.int64)
        total = int(counts.sum())
        val_tokens = int(counts[is_val].sum())
        k = n_val
        while val_tokens < row_len and total >= 2 * row_len and k < n_items - 1:
            nxt = order[k]
            if total - val_tokens - counts[nxt] < row_len:
                break
            is_val[nxt] = True
            val_tokens += int(counts[nxt])
            k += 1
    return is_val


# --------------------------------------------------------------------------- tokenizing


def _load_tokenizer(uri: str) -> GPTTokenizer:
    """tokenizer.json file or a directory holding one (e.g. a checkpoint dir), local or S3."""
    uri = os.fspath(uri)
    try:
        if storage.is_s3(uri):
            file = uri if uri.endswith(".json") else storage.join(uri, TOKENIZER_NAME)
            return GPTTokenizer.from_str(storage.read_text(file))
        return GPTTokenizer.load(uri)
    except (FileNotFoundError, storage.StorageError) as exc:
        raise DataError(f"tokenizer not found at {uri} (expected a tokenizer.json or a directory holding one): {exc}") from exc
    except Exception as exc:  # tokenizers raises plain Exception on a bad file
        raise DataError(f"tokenizer at {uri} could not be loaded: {exc}") from exc


ENGINES = ("local", "ray")


class _Encoder:
    """Encodes lists of texts with the chosen engine and keeps the progress bar's tokens/s."""

    def __init__(self, tok: GPTTokenizer, engine: str, pbar: tqdm, ray_address: str | None = None) -> None:
        self.tok = tok
        self.engine = engine
        self.pbar = pbar
        self.ray_address = ray_address
        self.dtype = token_dtype(tok.vocab_size)
        self.tokens = 0
        self.started = time.perf_counter()

    def progress(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.pbar.update(docs)
        self.pbar.set_postfix(tokens=self.tokens, tok_per_s=f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):,.0f}")

    def __call__(self, texts: list[str], dtype: np.dtype | None = None) -> list[np.ndarray]:
        dtype = np.dtype(dtype or self.dtype)
        if self.engine == "ray":
            from orchestrator.data.ray_engine import encode_with_ray

            return encode_with_ray(self.tok.to_str(), texts, dtype, self.progress, address=self.ray_address)
        out: list[np.ndarray] = []
        for i in range(0, len(texts), _ENCODE_CHUNK):
            chunk = self.tok.encode_batch(texts[i : i + _ENCODE_CHUNK])
            out.extend(np.asarray(ids, dtype=dtype) for ids in chunk)
            self.progress(len(chunk), sum(len(ids) for ids in chunk))
        return out


def _pack(docs: list[np.ndarray], eos_id: int, row_len: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Docs + eos each, concatenated, cut into ``[n, row_len]``; returns (rows, dropped tokens)."""
    if not docs:
        return np.zeros((0, row_len), dtype=dtype), 0
    eos = np.array([eos_id], dtype=dtype)
    stream = np.concatenate([part for doc in docs for part in (doc, eos)])
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len), len(stream) - n_rows * row_len


def finetune_row(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, pad_id: int, row_len: int
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """``(tokens, mask, truncated)`` for one example, or None if the response can't fit.

    The prompt is cut from the left to fit; at least one prompt token must remain (the first
    token of a row is never a target), so a response needs ``len + 1 <= row_len - 1``.
    """
    room = row_len - len(response_ids) - 1
    if room < 1:
        return None
    truncated = len(prompt_ids) > room
    prompt_ids = list(prompt_ids)[-room:] if truncated else list(prompt_ids)
    ids = [*prompt_ids, *response_ids, eos_id]
    tokens = np.full(row_len, pad_id, dtype=np.int64)
    tokens[: len(ids)] = ids
    mask = np.zeros(row_len, dtype=np.uint8)
    mask[len(prompt_ids) : len(ids)] = 1
    return tokens, mask, truncated


# --------------------------------------------------------------------------- writing


def _write_split(output: str, split: str, tokens: np.ndarray, mask: np.ndarray | None, manifest: Manifest, rows_per_shard: int):
    with ShardWriter(
        output,
        split,
        seq_len=manifest.seq_len,
        dtype=manifest.dtype,
        rows_per_shard=rows_per_shard,
        rows_per_member=manifest.rows_per_member,
        with_mask=mask is not None,
    ) as writer:
        if len(tokens):
            writer.write(tokens, mask)
    manifest.splits[split] = writer.close()


def prepare_dataset(
    inputs: list[str],
    output: str,
    *,
    vocab_size: int = 4096,
    seq_len: int = 128,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    rows_per_shard: int = 4096,
    rows_per_member: int = 256,
    seed: int = 0,
    progress: bool = True,
    val_inputs: list[str] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> Manifest:
    """Tokenize ``inputs`` into shards + tokenizer.json + manifest.json (written last) at ``output``.

    With ``val_inputs`` the validation split is exactly those files (a held-out task set) and
    ``val_fraction`` is ignored; otherwise documents are drawn for validation by ``choose_val``.
    ``engine="ray"`` tokenizes with Ray Data across the cluster at ``ray_address`` (or the Ray
    already initialised in this process, else an embedded one); the output is byte-identical
    to ``engine="local"`` (one process). Both show a progress bar with tokens/s.
    """
    if engine not in ENGINES:
        raise DataError(f"engine must be one of {ENGINES}, got {engine!r}")
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    output = os.fspath(output)
    storage.check_reachable(output)
    kind, items = load_corpus(inputs)
    if val_inputs:
        val_kind, val_items = load_corpus(val_inputs)
        if val_kind != kind:
            raise DataError(f"val_inputs hold {val_kind} data but inputs hold {kind} data")
        is_val = [False] * len(items) + [True] * len(val_items)
        items = items + val_items
    else:
        is_val = choose_val(len(items), val_fraction, seed)
    row_len = seq_len + 1

    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
    elif kind == "finetune":
        raise DataError("fine-tuning data needs tokenizer= the pre-trained model's tokenizer.json (or its checkpoint dir)")
    else:
        tok = GPTTokenizer.train((d.text for d, v in zip(items, is_val) if not v), vocab_size)

    dtype = token_dtype(tok.vocab_size)
    manifest = Manifest(
        kind=kind,
        tokenizer_sha256=tok.sha256,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        seq_len=seq_len,
        dtype=dtype.name,
        rows_per_member=rows_per_member,
        seed=seed,
    )

    # A re-run must never leave an old manifest pointing at half-rewritten shards.
    storage.delete(storage.join(output, MANIFEST_NAME))
    storage.write_text(storage.join(output, TOKENIZER_NAME), tok.to_str())

    total = len(items) * (2 if kind == "finetune" else 1)
    with tqdm(total=total, unit="doc", desc=f"tokenizing ({kind}, {engine})", disable=not progress) as pbar:
        encode = _Encoder(tok, engine, pbar, ray_address)
        if kind == "pretrain":
            encoded = encode([d.text for d in items])
            counts = [len(e) + 1 for e in encoded]
            if not val_inputs:
                is_val = choose_val(len(items), val_fraction, seed, counts, row_len)
            stats: dict = {"documents": {}, "tokens": {}, "rows": {}, "dropped_tail_tokens": {}}
            for split, want in (("train", False), ("val", True)):
                docs = [e for e, v in zip(encoded, is_val) if v == want]
                rows, dropped = _pack(docs, tok.eos_id, row_len, dtype)
                stats["documents"][split] = len(docs)
                stats["tokens"][split] = int(sum(len(d) + 1 for d in docs))
                stats["rows"][split] = len(rows)
                stats["dropped_tail_tokens"][split] = dropped
                if split == "train" and len(rows) == 0:
                    raise DataError(
                        f"corpus too small: training documents hold {stats['tokens']['train']} tokens, "
                        f"fewer than one row of seq_len+1 = {row_len}"
                    )
                _write_split(output, split, rows, None, manifest, rows_per_shard)
        else:
            prompts = encode([format_prompt(e.prompt) for e in items])
            responses = encode([e.response for e in items], np.int64)
            built = [finetune_row(p, r, tok.eos_id, tok.pad_id, row_len) for p, r in zip(prompts, responses)]
            stats = {"examples": {}, "rows": {}, "truncated": 0, "skipped_too_long": 0}
            for split, want in (("train", False), ("val", True)):
                picked = [b for b, v in zip(built, is_val) if v == want]
                rows = [b for b in picked if b is not None]
                stats["examples"][split] = len(picked)
                stats["rows"][split] = len(rows)
                stats["truncated"] += sum(b[2] for b in rows)
                stats["skipped_too_long"] += len(picked) - len(rows)
                if split == "train" and not rows:
                    raise DataError(f"no fine-tuning example fits in seq_len={seq_len} (responses are too long)")
                tokens = np.stack([b[0] for b in rows]) if rows else np.zeros((0, row_len), dtype=dtype)
                mask = np.stack([b[1] for b in rows]) if rows else np.zeros((0, row_len), dtype=np.uint8)
                _write_split(output, split, tokens.astype(dtype), mask, manifest, rows_per_shard)
        pbar.set_postfix(
            tokens=encode.tokens, tok_per_s=f"{encode.tokens / max(time.perf_counter() - encode.started, 1e-9):,.0f}",
            refresh=True,
        )

    manifest.stats = stats
    storage.write_text(storage.join(output, MANIFEST_NAME), manifest.to_json())
    return manifest
