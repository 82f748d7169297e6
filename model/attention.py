"""Multi-head causal self-attention, with optional KV-cache decoding."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig
from model.kv_cache import KVCache


# scaled_dot_product_attention's kernels by the names a job spec uses (train.attention_kernel)
ATTENTION_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                     "math": "MATH"}


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """Limit scaled_dot_product_attention to one kernel inside the block; "auto" leaves PyTorch's choice.

    PyTorch picks by a fixed priority order, which need not be the fastest kernel on a given GPU
    (cuDNN's may beat FlashAttention-2 on an H100); a training job can name the one it wants.
    Generation with a KV cache may pass a mask, which CUDA's FlashAttention does not take, so
    only causal training and eval passes belong in the block.
    """
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, ATTENTION_KERNELS[name])])


def chunk_causal_mask(n_new: int, n_cached: int, device: torch.device) -> Tensor:
    """Boolean mask [n_new, n_cached + n_new]: new token i may see keys 0 .. n_cached + i.

    SDPA's is_causal aligns the triangle to the top-left, which is wrong once queries
    start at an offset into the keys, so appended chunks need this explicit mask.
    """
    return torch.ones(n_new, n_cached + n_new, dtype=torch.bool, device=device).tril(
        diagonal=n_cached
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slice of a shared KVCache belongs to this layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

        n_cached = 0
        if kv_cache is not None:
            n_cached = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)

        dropout_p = self.dropout if self.training else 0.0
        if n_cached == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new token may attend to every cached key: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            mask = chunk_causal_mask(T, n_cached, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
