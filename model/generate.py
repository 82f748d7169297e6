"""Autoregressive decoding, as a stream of token ids (for serving) or a list."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from model.gpt import GPT
from model.kv_cache import KVCache
from model.sampling import SamplingParams, make_generator, sample_next_token

__all__ = ["SamplingParams", "generate", "iter_generate", "sample_next_token"]


def iter_generate(
    model: GPT, prompt_ids: list[int], params: SamplingParams, use_kv_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time; stop after max_new_tokens or at a stop token (not yielded).

    Without the cache the context is cropped to the last block_size tokens. With it, the
    prompt must fit in block_size and generation ends once the cache is full, since cached
    positions cannot slide. Bad input raises here, at call time, not at the first next().
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must contain at least one token")
    block_size = model.config.block_size
    if use_kv_cache and len(prompt_ids) > block_size:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens exceeds block_size {block_size}; "
            "shorten it or pass use_kv_cache=False to crop the context"
        )
    return _decode(model, list(prompt_ids), params, use_kv_cache)


def generate(
    model: GPT, prompt_ids: list[int], params: SamplingParams, use_kv_cache: bool = True
) -> list[int]:
    """All new token ids at once; see iter_generate."""
    return list(iter_generate(model, prompt_ids, params, use_kv_cache=use_kv_cache))


def _decode(
    model: GPT, context: list[int], params: SamplingParams, use_kv_cache: bool
) -> Iterator[int]:
    if params.max_new_tokens == 0:
        return
    block_size = model.config.block_size
    generator = make_generator(params.seed)
    stop = set(params.stop_token_ids)
    cache: KVCache | None = None
    modules = list(model.modules())  # walked once, not twice per token (see _inference)

    with _inference(model, modules):
        if use_kv_cache:
            cache = model.new_kv_cache(batch_size=1)
            logits = _last_logits(model, context, cache)  # prefill the whole prompt in one pass
        else:
            logits = _last_logits(model, context[-block_size:], None)
        token = sample_next_token(logits, params, generator)

    for n_done in range(1, params.max_new_tokens + 1):
        if token in stop:
            return
        yield token
        if n_done == params.max_new_tokens:
            return
        if cache is not None and cache.length >= block_size:
            return  # no room left to feed the token just produced
        with _inference(model, modules):
            if cache is not None:
                logits = _last_logits(model, [token], cache)
            else:
                context.append(token)
                logits = _last_logits(model, context[-block_size:], None)
            token = sample_next_token(logits, params, generator)


@contextmanager
def _inference(model: GPT, modules: list[torch.nn.Module] | None = None) -> Iterator[None]:
    """Eval mode + inference_mode around one step only.

    Entered per step rather than around the whole generator, so neither the grad mode nor
    the model's train/eval flag leaks to the caller between yields. The flags are only
    rewritten when some module is in training mode: model.eval()/train() recurse through
    every module, which cost ~5 % of a decode step on a 6-layer model.
    """
    was_training = model.training
    toggled = any(m.training for m in (model.modules() if modules is None else modules))
    if toggled:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if toggled:
            model.train(was_training)


def _last_logits(model: GPT, ids: list[int], cache: KVCache | None) -> Tensor:
    idx = torch.tensor([ids], dtype=torch.long, device=model.transformer.wte.weight.device)
    logits, _ = model(idx, kv_cache=cache)
    return logits[0, -1]
