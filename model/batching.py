"""Continuous batching: concurrent generations share each decode forward pass.

Every sequence keeps its own KV cache, sampling parameters, private RNG (seeded requests) and
stop conditions; only the token-at-a-time decode step is batched. A new request is prefilled
alone (one forward pass over its prompt) and then joins the running batch at the next step;
a finished or cancelled one leaves it at once, freeing its slot and its cache.

Batch invariance: with ``batch_invariant=True`` (the default) a request's tokens do not depend
on what else is being decoded. CPU GEMM kernels pick their blocking from the number of rows,
so a row of a 16-row matmul can differ in the last bits from the same row computed alone,
which can flip a sampled token. In invariant mode every row-wise op (LayerNorm, the linear
layers, GELU) runs on fixed chunks of ``invariant_rows`` rows (zero-padded), attention runs
per sequence on its own cache, and sampling per sequence: the same request gives bit-identical
logits alone or in any batch. The price is paid by small batches: a lone sequence computes a
16-row chunk (on a 2-core CPU and a 256-wide model, about 2x the time of a 1-row step; for
wider models, whose 1-row step is bound by reading the weights, much less).
``batch_invariant=False`` uses plain batched matmuls; then a batch of one reproduces
``model.generate`` exactly, but a sequence's tokens may change with its batch mates.

Pure PyTorch + threading; no Ray, no asyncio. ``BatchEngine.step()`` can be driven by hand
(tests) or by the background thread that ``start()`` launches (serving).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from model.gpt import GPT
from model.kv_cache import KVCache
from model.sampling import SamplingParams, make_generator, sample_next_token

__all__ = [
    "FINISH_CANCELLED",
    "FINISH_ERROR",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "BatchEngine",
    "CollectingSink",
    "TokenSink",
    "decode_step",
]

FINISH_STOP = "stop"  # a stop token, or the sink asked to stop (e.g. a stop string matched)
FINISH_LENGTH = "length"  # max_new_tokens reached, or the context is full
FINISH_CANCELLED = "cancelled"  # cancel() was called (client went away)
FINISH_ERROR = "error"  # an exception while serving this sequence; the engine keeps running


class TokenSink(Protocol):
    """Receives one sequence's output. Both methods are called on the engine's thread."""

    def on_token(self, token_id: int) -> bool:
        """A new token (stop tokens are never passed). Return False to finish here ("stop")."""

    def on_finish(self, reason: str, error: BaseException | None) -> None:
        """Called exactly once, last; reason is one of the FINISH_* constants."""


class CollectingSink:
    """Collects token ids; `done` is set when the sequence finished (for tests and benchmarks)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def on_token(self, token_id: int) -> bool:
        self.tokens.append(token_id)
        return True

    def on_finish(self, reason: str, error: BaseException | None) -> None:
        self.reason, self.error = reason, error
        self.done.set()


@dataclass(eq=False)
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: TokenSink
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    cache: KVCache | None = None
    next_token: int = -1  # sampled and passed to the sink, not yet fed to the model
    n_generated: int = 0
    finished: bool = False
    submitted_at: float = field(default_factory=time.monotonic)


def decode_step(
    model: GPT,
    tokens: Sequence[int],
    caches: Sequence[KVCache],
    batch_invariant: bool = True,
    invariant_rows: int = 16,
) -> Tensor:
    """Feed one token per sequence (each with its own cache, advanced by one); logits [B, V].

    Call under torch.inference_mode() with the model in eval mode. See the module docstring
    for what batch_invariant guarantees.
    """
    B = len(tokens)
    if B == 0 or len(caches) != B:
        raise ValueError(f"need one cache per token, got {B} tokens and {len(caches)} caches")
    for cache in caches:
        cache.check_room(1)
    tr = model.transformer
    cfg = model.config
    C, H = cfg.n_embd, cfg.n_head
    D = C // H
    device = tr.wte.weight.device
    R = invariant_rows if batch_invariant else 0

    def rowwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        # fixed-size row chunks: the kernels (and so the bits) of each row never depend on B
        if not R or x.shape[0] == R:
            return fn(x)
        return torch.cat([fn(chunk) for chunk in x.split(R)])

    idx = torch.tensor(list(tokens), dtype=torch.long, device=device)
    pos = torch.tensor([c.length for c in caches], dtype=torch.long, device=device)
    x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # [B, C]
    padded = B if not R else -(-B // R) * R
    if padded != B:
        x = torch.cat([x, x.new_zeros(padded - B, C)])

    for layer, block in enumerate(tr.h):
        attn = block.attn
        qkv = rowwise(lambda t, b=block: b.attn.c_attn(b.ln_1(t)), x)[:B]
        q, k, v = (
            t.reshape(B, 1, H, D).transpose(1, 2) for t in qkv.split(C, dim=1)
        )  # [B, H, 1, D], as CausalSelfAttention lays them out
        outs = []
        for i, cache in enumerate(caches):
            keys, values = cache.update(layer, k[i : i + 1], v[i : i + 1])
            outs.append(F.scaled_dot_product_attention(q[i : i + 1], keys, values))
        y = (outs[0] if B == 1 else torch.cat(outs)).transpose(1, 2).contiguous().view(B, C)
        if padded != B:
            y = torch.cat([y, y.new_zeros(padded - B, C)])
        x = x + rowwise(lambda t, a=attn: a.resid_dropout(a.c_proj(t)), y)
        x = x + rowwise(lambda t, b=block: b.mlp(b.ln_2(t)), x)

    for cache in caches:
        cache.advance(1)
    return rowwise(lambda t: model.lm_head(tr.ln_f(t)), x)[:B]


class BatchEngine:
    """Schedules many generations over one model; thread-safe submit/cancel.

    Each step: drop cancelled sequences, admit waiting ones up to max_batch_size (prefilling
    at most ~prefill_token_budget prompt tokens per step so running streams keep flowing),
    then one batched decode step for every running sequence.
    """

    def __init__(
        self,
        model: GPT,
        max_batch_size: int = 32,
        prefill_token_budget: int = 2048,
        batch_invariant: bool = True,
        invariant_rows: int = 16,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if invariant_rows < 1:
            raise ValueError(f"invariant_rows must be >= 1, got {invariant_rows}")
        self.model = model.eval()
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = max(1, prefill_token_budget)
        self.batch_invariant = batch_invariant
        self.invariant_rows = invariant_rows
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._cancel: set[int] = set()
        self._active: list[_Sequence] = []  # touched by the stepping thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = dict(
            submitted=0, finished=0, cancelled=0, errors=0, steps=0,
            decode_tokens=0, prefill_tokens=0, max_batch_seen=0,
        )

    # ---- public, any thread -------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: TokenSink) -> int:
        """Queue a generation; returns its id. Bad input raises ValueError here, not later."""
        prompt = [int(t) for t in prompt_ids]
        cfg = self.model.config
        if not prompt:
            raise ValueError("prompt_ids must contain at least one token")
        if len(prompt) > cfg.block_size:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds block_size {cfg.block_size}")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        seq = _Sequence(
            id=next(self._ids), prompt_ids=prompt, params=params, sink=sink,
            generator=make_generator(params.seed), stop_ids=frozenset(params.stop_token_ids),
        )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._waiting.append(seq)
            self._counters["submitted"] += 1
            self._cond.notify()
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Finish a sequence early ("cancelled"); its slot and cache are freed at the next step."""
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counters, active=len(self._active), waiting=len(self._waiting),
                        max_batch_size=self.max_batch_size)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> BatchEngine:
        """Run the scheduling loop on a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptctl-batch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; sequences still queued or running finish as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._drop_all(FINISH_CANCELLED, None)

    # ---- stepping -----------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._active or self._cancel)

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step on the calling thread until nothing is queued or running (tests, benchmarks)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"still busy after {max_steps} steps")

    def step(self) -> None:
        """One scheduling iteration: cancellations, admissions (prefill), one decode step."""
        with torch.inference_mode():
            self._apply_cancellations()
            self._admit()
            if self._active:
                self._decode()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._waiting or self._active or self._cancel):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # defensive: step() already isolates per-sequence errors
                self._drop_all(FINISH_ERROR, error)

    def _apply_cancellations(self) -> None:
        with self._cond:
            if not self._cancel:
                return
            ids, self._cancel = self._cancel, set()
            dropped = [s for s in self._waiting if s.id in ids]
            self._waiting = deque(s for s in self._waiting if s.id not in ids)
        dropped += [s for s in self._active if s.id in ids]
        self._active = [s for s in self._active if s.id not in ids]
        for seq in dropped:
            self._finish(seq, FINISH_CANCELLED)

    def _admit(self) -> None:
        budget = self.prefill_token_budget
        while len(self._active) < self.max_batch_size:
            with self._cond:
                if not self._waiting:
                    return
                if budget <= 0:
                    return
                seq = self._waiting.popleft()
            budget -= len(seq.prompt_ids)
            try:
                self._prefill(seq)
            except Exception as error:
                self._finish(seq, FINISH_ERROR, error)

    def _prefill(self, seq: _Sequence) -> None:
        params = seq.params
        if params.max_new_tokens == 0:
            self._finish(seq, FINISH_LENGTH)
            return
        cfg = self.model.config
        # room for the prompt and every generated token but the last (which is never fed)
        max_len = min(cfg.block_size, len(seq.prompt_ids) + params.max_new_tokens - 1)
        ref = self.model.transformer.wte.weight
        seq.cache = KVCache(cfg.n_layer, 1, cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                            device=ref.device, dtype=ref.dtype)
        idx = torch.tensor([seq.prompt_ids], dtype=torch.long, device=ref.device)
        logits, _ = self.model(idx, kv_cache=seq.cache)
        with self._cond:
            self._counters["prefill_tokens"] += len(seq.prompt_ids)
        token = sample_next_token(logits[0, -1], params, seq.generator)
        if self._accept(seq, token):
            self._active.append(seq)

    def _decode(self) -> None:
        batch = self._active
        try:
            logits = decode_step(
                self.model, [s.next_token for s in batch], [s.cache for s in batch],
                batch_invariant=self.batch_invariant, invariant_rows=self.invariant_rows,
            )
        except Exception as error:
            self._active = []
            for seq in batch:
                self._finish(seq, FINISH_ERROR, error)
            return
        if logits.device.type != "cpu":
            logits = logits.cpu()  # one transfer; sampling runs on CPU anyway
        with self._cond:
            self._counters["steps"] += 1
            self._counters["decode_tokens"] += len(batch)
            self._counters["max_batch_seen"] = max(self._counters["max_batch_seen"], len(batch))
        keep = []
        for i, seq in enumerate(batch):
            try:
                token = sample_next_token(logits[i], seq.params, seq.generator)
                if self._accept(seq, token):
                    keep.append(seq)
            except Exception as error:
                self._finish(seq, FINISH_ERROR, error)
        self._active = keep

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Hand a sampled token on; False when the sequence is finished (same rules as generate)."""
        if token in seq.stop_ids:
            self._finish(seq, FINISH_STOP)
            return False
        seq.n_generated += 1
        if not seq.sink.on_token(token):
            self._finish(seq, FINISH_STOP)
            return False
        if seq.n_generated >= seq.params.max_new_tokens or seq.cache.length >= seq.cache.max_len:
            self._finish(seq, FINISH_LENGTH)
            return False
        seq.next_token = token
        return True

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.cache = None  # free the memory now, not when the sink lets go
        with self._cond:
            self._counters["finished"] += 1
            if reason == FINISH_CANCELLED:
                self._counters["cancelled"] += 1
            elif reason == FINISH_ERROR:
                self._counters["errors"] += 1
        try:
            seq.sink.on_finish(reason, error)
        except Exception:
            pass  # a broken sink must not take the engine down

    def _drop_all(self, reason: str, error: BaseException | None) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        active, self._active = self._active, []
        for seq in waiting + active:
            self._finish(seq, reason, error)
