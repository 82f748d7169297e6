import math
from collections import Counter

import pytest
import torch

from model import SamplingParams, generate, iter_generate
from model.generate import sample_next_token


def draws(logits, params, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Counter(sample_next_token(logits, params, g) for _ in range(n))


def test_seeded_sampling_is_reproducible_and_ignores_global_rng(model):
    params = SamplingParams(max_new_tokens=25, temperature=1.0, seed=123)
    torch.manual_seed(0)
    first = generate(model, [1, 2, 3], params)
    torch.manual_seed(999)
    state = torch.get_rng_state()
    second = generate(model, [1, 2, 3], params)
    assert first == second
    assert torch.equal(state, torch.get_rng_state())  # global RNG left untouched
    assert generate(model, [1, 2, 3], params, use_kv_cache=False) == first


def test_different_seeds_differ(model):
    runs = {
        tuple(generate(model, [1, 2, 3], SamplingParams(max_new_tokens=25, seed=s)))
        for s in range(4)
    }
    assert len(runs) == 4


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, [4, 8], SamplingParams(max_new_tokens=30, temperature=0.0))
    top1 = generate(
        model, [4, 8], SamplingParams(max_new_tokens=30, temperature=1.5, top_k=1, seed=5)
    )
    assert top1 == greedy


def test_stop_token_stops_and_is_not_yielded(model):
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0)
    full = generate(model, [1, 2, 3], greedy)
    stop = full[5]
    cut = full.index(stop)
    stopped = generate(
        model, [1, 2, 3], SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=(stop,))
    )
    assert stopped == full[:cut]
    assert stop not in stopped


def test_max_new_tokens(model):
    assert generate(model, [1], SamplingParams(max_new_tokens=0)) == []
    assert len(generate(model, [1], SamplingParams(max_new_tokens=7, seed=0))) == 7


def test_streaming_leaves_modes_alone(model):
    model.train()
    stream = iter_generate(model, [1, 2], SamplingParams(max_new_tokens=3, seed=1))
    next(stream)
    assert model.training
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert len(list(stream)) == 2


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next_token(logits, SamplingParams(temperature=0.0), None) == 1


def test_temperature_one_matches_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0])
    counts = draws(logits, SamplingParams(), n=6000)
    probs = torch.softmax(logits, 0)
    for i in range(3):
        expected = 6000 * probs[i].item()
        assert abs(counts[i] - expected) < 5 * math.sqrt(expected)


def test_low_temperature_sharpens():
    logits = torch.tensor([0.0, 1.0, 2.0])
    assert draws(logits, SamplingParams(temperature=0.05), n=500)[2] == 500


def test_top_k_restricts_support():
    logits = torch.tensor([1.0, 5.0, 4.0, 3.0, 0.0])
    assert set(draws(logits, SamplingParams(top_k=2, temperature=5.0))) == {1, 2}


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1]))
    # (thresholds kept off exact cumulative sums, which float rounding makes ambiguous)
    assert set(draws(logits, SamplingParams(top_p=0.45))) == {1}
    assert set(draws(logits, SamplingParams(top_p=0.6))) == {1, 2}
    assert len(draws(logits, SamplingParams(top_p=0.85))) == 3
    counts = draws(logits, SamplingParams(top_p=0.79), n=4000)
    assert set(counts) == {1, 2}
    assert abs(counts[1] / 4000 - 0.5 / 0.8) < 0.04  # renormalised over the kept set
    assert set(draws(logits, SamplingParams(top_p=1.0))) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(top_k=0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_new_tokens=-1),
    ],
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
