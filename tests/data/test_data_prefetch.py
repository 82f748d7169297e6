"""Background loading: order, bounded read-ahead, errors in the consumer, clean shutdown."""

import gc
import itertools
import threading
import time

import pytest
import torch

from workers.data import train_batches, train_batches_global
from workers.data_prefetch import Prefetcher
from workers.shards import load_manifest


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Source:
    """A generator-like source that records how far it ran and whether it was closed."""

    def __init__(self, n=None, fail_at=None):
        self.produced = 0
        self.closed = threading.Event()
        self.n, self.fail_at = n, fail_at
        self.gen = self._run()

    def _run(self):
        try:
            for i in itertools.count() if self.n is None else range(self.n):
                if i == self.fail_at:
                    raise KeyError(f"boom at {i}")
                self.produced = i + 1
                yield i
        finally:
            self.closed.set()

    def __iter__(self):
        return self.gen

    def __next__(self):
        return next(self.gen)

    def close(self):
        self.gen.close()


def test_order_and_bounded_read_ahead():
    src = Source()
    p = Prefetcher(src, depth=3)
    assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert _wait_for(lambda: src.produced >= 8)
    time.sleep(0.1)
    assert src.produced <= 5 + 3 + 1, "at most depth items (+ one in hand) ahead"
    p.close()
    assert src.closed.is_set() and not p.alive


def test_finite_source_ends_and_error_is_reraised_in_order():
    assert list(Prefetcher(Source(n=4).gen)) == [0, 1, 2, 3]
    p = Prefetcher(Source(fail_at=3), depth=8)
    assert [next(p) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="boom at 3"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)


def test_garbage_collection_stops_the_thread():
    src = Source()
    p = Prefetcher(src, depth=2)
    next(p)
    thread = p._thread
    del p
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive()), "dropping the iterator stops the producer"
    assert src.closed.is_set(), "and closes the source"


def test_loaders_shut_down_and_keep_order(pretrain_data):
    names = load_manifest(pretrain_data).shard_names("train")
    with train_batches(pretrain_data, names, 4, seed=3, prefetch=2) as loader:
        a = [next(loader) for _ in range(5)]
    assert not loader.alive
    b = list(itertools.islice(train_batches(pretrain_data, names, 4, seed=3, prefetch=64), 5))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    g = train_batches_global(pretrain_data, 0, 1, 4, seed=3)
    next(g)
    thread = g._thread
    del g
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive())
