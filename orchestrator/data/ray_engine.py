"""Tokenization across a Ray cluster with Ray Data (``prepare_dataset(..., engine="ray")``).

The documents are split into blocks (``ray.data.from_items``), every block is tokenized by a
``map_batches`` task wherever the cluster has a free CPU, and the ids come back in document
order (``preserve_order``), so the token stream, the packing and the shards are exactly those
of the single-process engine. The driver still reads the corpus (it needs every document for
the validation split and the ``file:line`` error messages) and packs and writes the shards;
tokenization is the part that scales with the cluster.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable

import numpy as np

__all__ = ["encode_with_ray"]

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(tokenizer_json: str):
    """One tokenizer per worker process (keyed by content hash)."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from model.tokenizer import GPTTokenizer

        tok = _TOKENIZERS[key] = GPTTokenizer.from_str(tokenizer_json)
    return tok


def _encode_batch(batch: dict[str, np.ndarray], tokenizer_json: str, dtype: str) -> dict[str, np.ndarray]:
    tok = _tokenizer(tokenizer_json)
    encoded = tok.encode_batch([str(t) for t in batch["text"]])
    ids = np.empty(len(encoded), dtype=object)
    for i, doc in enumerate(encoded):
        ids[i] = np.asarray(doc, dtype=dtype).tobytes()
    return {"i": np.asarray(batch["i"], dtype=np.int64), "ids": ids}


def encode_with_ray(
    tokenizer_json: str,
    texts: list[str],
    dtype: np.dtype,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    address: str | None = None,
    batch_size: int = 512,
) -> list[np.ndarray]:
    """Token ids of every text (same as ``tok.encode_batch``), computed by Ray Data tasks.

    ``on_progress(documents, tokens)`` is called as results arrive. Joins the Ray cluster at
    ``address`` (or the one already initialised in this process; else starts an embedded one).
    """
    import ray

    from orchestrator.ray_runtime import ensure_ray

    if not texts:
        return []
    ensure_ray(address)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # ids come back in document order
    ctx.enable_progress_bars = False  # ours shows documents and tokens/s
    try:
        dtype = np.dtype(dtype)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        blocks = max(1, min(math.ceil(len(texts) / batch_size), 4 * max(1, cpus)))
        ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=blocks)
        ds = ds.map_batches(
            _encode_batch,
            fn_kwargs={"tokenizer_json": tokenizer_json, "dtype": dtype.str},
            batch_size=batch_size,
            batch_format="numpy",
        )
        out: list[np.ndarray | None] = [None] * len(texts)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            tokens = 0
            for i, raw in zip(batch["i"], batch["ids"]):
                arr = np.frombuffer(bytes(raw), dtype=dtype)
                out[int(i)] = arr
                tokens += len(arr)
            if on_progress is not None:
                on_progress(len(batch["i"]), tokens)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    missing = [i for i, arr in enumerate(out) if arr is None]
    if missing:
        raise RuntimeError(f"Ray Data returned no tokens for {len(missing)} document(s), e.g. #{missing[0]}")
    return out  # type: ignore[return-value]
