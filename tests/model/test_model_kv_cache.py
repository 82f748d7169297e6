import pytest
import torch
from model_testutil import VOCAB, make_model

from model import SamplingParams, generate, iter_generate
from model.attention import chunk_causal_mask

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0)


@pytest.mark.parametrize("chunks", [[20], [1] * 20, [3, 1, 4, 1, 5, 6], [7, 13], [1, 2, 17]])
def test_chunked_cache_forward_equals_full_forward(model, chunks):
    """Prefill and append chunks of any length (>1 needs the offset causal mask)."""
    torch.manual_seed(4)
    idx = torch.randint(0, VOCAB, (2, sum(chunks)))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    pieces, start = [], 0
    for n in chunks:
        logits, _ = model(idx[:, start : start + n], kv_cache=cache)
        pieces.append(logits)
        start += n
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


def test_chunk_mask_is_offset_causal():
    mask = chunk_causal_mask(n_new=2, n_cached=3, device=torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_cache_shape_and_overflow(model):
    cfg = model.config
    cache = model.new_kv_cache(batch_size=3)
    assert cache.keys.shape == (
        cfg.n_layer,
        3,
        cfg.n_head,
        cfg.block_size,
        cfg.n_embd // cfg.n_head,
    )
    assert cache.keys.dtype == torch.float64 and cache.length == 0
    model(torch.zeros(3, cfg.block_size - 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(3, 2, dtype=torch.long), kv_cache=cache)
    assert cache.length == cfg.block_size - 1  # a refused chunk leaves the cache untouched
    model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("prompt", [[7], [1, 2, 3], [5, 9, 7, 7, 2, 40, 33, 12]])
def test_greedy_with_cache_equals_recompute(prompt):
    model = make_model(block_size=64)
    cached = generate(model, prompt, GREEDY, use_kv_cache=True)
    recomputed = generate(model, prompt, GREEDY, use_kv_cache=False)
    assert len(cached) == GREEDY.max_new_tokens
    assert cached == recomputed


def test_greedy_equality_is_not_vacuous():
    """Different prompts must lead to different continuations, else equality proves little."""
    model = make_model(block_size=64)
    outs = {tuple(generate(model, p, GREEDY)) for p in ([1, 2, 3], [4, 5, 6], [50, 60, 70])}
    assert len(outs) == 3
    assert len(set(generate(model, [1, 2, 3], GREEDY))) > 2


def test_cache_stops_at_block_size_and_no_cache_crops(model):
    block = model.config.block_size
    prompt = list(range(1, block - 2))  # block-3 tokens
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    cached = generate(model, prompt, params)
    cropped = generate(model, prompt, params, use_kv_cache=False)
    # Cache holds block tokens; the last position still predicts one more token.
    assert len(cached) == block - len(prompt) + 1
    assert len(cropped) == 20
    assert cropped[: len(cached)] == cached

    long_prompt = list(range(block + 5))
    with pytest.raises(ValueError, match="block_size"):
        iter_generate(model, long_prompt, params)  # raised at call time, not first next()
    assert len(generate(model, long_prompt, params, use_kv_cache=False)) == 20


def test_empty_prompt_rejected(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], GREEDY)
