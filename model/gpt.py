"""The GPT-2 language model: embeddings, a stack of blocks, and a tied LM head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from model.block import Block
from model.config import GPTConfig
from model.kv_cache import KVCache

IGNORE_INDEX = -100  # target value that contributes nothing to the loss


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: input embedding and output projection are one Parameter.
        self.lm_head.weight = self.transformer.wte.weight
        # trade compute for memory: recompute each block's activations in backward
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale residual-stream projections so the residual variance does not
        # grow with depth (two residual additions per block).
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns (logits [B, T, V], loss or None).

        targets are already shifted: targets[:, t] is the token that should follow idx[:, t];
        -100 marks ignored positions. With loss_mask (0/1, shape of targets) the loss is
        sum(ce * mask) / max(sum(mask), 1) over non-ignored positions (response-only
        fine-tuning); otherwise the mean over non-ignored positions. With kv_cache, idx
        holds only the new tokens, positions continue at kv_cache.length, and the cache
        is extended in place.
        """
        B, T = idx.shape
        start = 0
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(
                    f"KV cache batch size {kv_cache.batch_size} != input batch size {B}"
                )
            kv_cache.check_room(T)
            start = kv_cache.length
        elif T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")

        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.activation_checkpointing and self.training and kv_cache is None
        for block in self.transformer.h:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, None, use_reentrant=False)
            else:
                x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))

        loss = None if targets is None else lm_loss(logits, targets, loss_mask)
        return logits, loss

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied LM head counts once); optionally without token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def new_kv_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache sized to block_size, on the model's device/dtype unless told otherwise."""
        ref = self.transformer.wte.weight
        c = self.config
        return KVCache(
            n_layer=c.n_layer,
            batch_size=batch_size,
            n_head=c.n_head,
            max_len=c.block_size,
            head_dim=c.n_embd // c.n_head,
            device=ref.device if device is None else device,
            dtype=ref.dtype if dtype is None else dtype,
        )

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices (matmul weights and embeddings), not biases or LayerNorm gains."""
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() de-duplicates the tied weight
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def lm_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy in fp32 (logits may be bf16 under autocast).

    Uses sum/count instead of F.cross_entropy's mean so an all-ignored batch gives 0, not NaN.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape[:-1])}"
        )
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    weight = (targets.reshape(-1) != IGNORE_INDEX).float()
    if loss_mask is not None:
        if loss_mask.shape != targets.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} != targets shape {tuple(targets.shape)}"
            )
        weight = weight * loss_mask.reshape(-1).float()
    return (ce * weight).sum() / weight.sum().clamp(min=1.0)
