"""Preallocated key/value cache for incremental decoding.

Preallocating to block_size means decoding never reallocates or concatenates,
and the one place that knows how many positions are filled is `length`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of shape [n_layer, B, n_head, max_len, head_dim]; positions [0, length) are valid."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def check_room(self, n_new: int) -> None:
        """Raise before any layer writes, so an overflow never leaves the cache half-updated."""
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {n_new} new tokens exceeds "
                f"block_size {self.max_len}"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new chunk's k/v ([B, n_head, T, head_dim]) for one layer; return all keys/values so far.

        `length` is not advanced here: every layer writes at the same offset and the
        model calls `advance` once the whole forward pass has succeeded.
        """
        t = k.shape[2]
        self.check_room(t)
        end = self.length + t
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n_new: int) -> None:
        self.check_room(n_new)
        self.length += n_new

    def reset(self) -> None:
        """Reuse the buffers for a new sequence; stale values are never read past `length`."""
        self.length = 0
