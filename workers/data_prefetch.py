"""Run an iterator in a background thread behind a bounded queue.

Decoding and batching happen in the thread while the training step runs, so a step only
waits for data when the loader is slower than the step. Order is the source's order
(one producer, FIFO queue). An exception in the source is re-raised in the consumer at the
point of the stream where it happened (after the items produced before it). ``close()``,
leaving a ``with`` block, or dropping the last reference stops the thread and closes the
source (so its open shard streams are closed) — the thread holds no reference back to the
:class:`Prefetcher`, which is what lets garbage collection trigger the shutdown.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
_ITEM, _END, _ERROR = 0, 1, 2
_POLL_S = 0.05
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, stop every live producer before daemon threads are frozen."""
    for prefetcher in list(_LIVE):
        prefetcher.close(timeout=2.0)


def _put(q: queue.Queue, stop: threading.Event, message: tuple) -> bool:
    """Put unless stopped; False if the consumer went away."""
    while not stop.is_set():
        try:
            q.put(message, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in source:
            if not _put(q, stop, (_ITEM, item)):
                return
        _put(q, stop, (_END, None))
    except BaseException as exc:  # handed to the consumer, re-raised there
        _put(q, stop, (_ERROR, exc))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass


class Prefetcher(Iterator[T], Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    ``finalize`` (optional) runs on each item in the consumer's thread, e.g. to wrap numpy
    arrays as torch tensors, so the producer thread never runs torch code (torch work in a
    daemon thread during interpreter shutdown can abort the process). Extra attributes (e.g.
    a loader's ``stats``) may be set on the instance by the caller.
    """

    def __init__(self, source: Iterator[Any], depth: int = 16, name: str = "gptctl-data",
                 finalize: Callable[[Any], T] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._finalize = finalize
        self._thread = threading.Thread(target=_produce, args=(source, self._queue, self._stop), name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value if self._finalize is None else self._finalize(value)
        self._done = True
        self._stop.set()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer, close the source, wait for the thread (up to ``timeout`` s)."""
        self._done = True
        self._stop.set()
        self._drain()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    @property
    def alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # No join here: garbage collection must not block on a slow read; the thread sees
        # the stop flag at its next put and closes the source itself.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
