import json

import pytest
import torch

from model import GPT, PRESETS, GPTConfig, config_from_preset
from model.config import _count_parameters, flops_per_token


def test_dict_round_trip_through_json():
    cfg = GPTConfig(
        vocab_size=1000, block_size=64, n_layer=3, n_head=4, n_embd=32, dropout=0.1, bias=False
    )
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_dict_names_unknown_key():
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict({"n_heads": 4})


def test_presets():
    assert config_from_preset("tiny") == GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)
    expected = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (n_layer, n_head, n_embd) in expected.items():
        cfg = config_from_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
    assert config_from_preset("tiny", vocab_size=300).vocab_size == 300


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        config_from_preset("gpt5")
    for name in PRESETS:
        assert name in str(err.value)


def test_invalid_shape_rejected():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_flops_per_token_gpt2():
    cfg = config_from_preset("gpt2", vocab_size=50257)
    non_embedding = 124_439_808 - 50257 * 768 - 1024 * 768
    lm_head = 50257 * 768
    assert flops_per_token(cfg, 1024) == 6 * (non_embedding + lm_head) + 12 * 12 * 768 * 1024 == 855_166_464
    # ~0.86 GFLOPs/token (llm.c's estimate for GPT-2 124M at T=1024); attention grows with context.
    assert flops_per_token(cfg, 2048) - flops_per_token(cfg, 1024) == 12 * 12 * 768 * 1024
    with pytest.raises(ValueError):
        flops_per_token(cfg, 0)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("bias", [True, False])
def test_config_param_count_matches_model(name, bias):
    cfg = config_from_preset(name, bias=bias)
    with torch.device("meta"):
        model = GPT(cfg)
    assert _count_parameters(cfg) == model.num_parameters()
    assert _count_parameters(cfg, exclude_embeddings=True) == model.num_parameters(
        exclude_embeddings=True
    )
