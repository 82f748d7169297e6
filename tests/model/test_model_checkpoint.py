import json
import pickle

import pytest
import torch
from model_testutil import VOCAB, make_model
from safetensors import safe_open
from safetensors.torch import save_file

from model import GPT, GPTConfig, GPTTokenizer, load_pretrained, save_pretrained
from model.checkpoint import load_config, state_dict_for_saving


def test_round_trip_identical_logits_and_tied(tmp_path, tokenizer):
    model = make_model().float()
    save_pretrained(tmp_path, model, model.config, tokenizer)
    assert {p.name for p in tmp_path.iterdir()} == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    }

    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert GPTTokenizer.load(tmp_path).sha256 == tokenizer.sha256
    assert load_config(tmp_path) == model.config
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)


def test_tied_weights_stay_tied_through_training_step(tmp_path):
    save_pretrained(tmp_path, make_model().float(), make_model().config)
    model = load_pretrained(tmp_path).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, VOCAB, (1, 8))
    model(idx, idx)[1].backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_half_precision_weights_saved_as_fp32(tmp_path):
    model = make_model().to(torch.bfloat16)
    save_pretrained(tmp_path, model, model.config)
    loaded = load_pretrained(tmp_path)
    assert loaded.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight.float())


def test_wrapper_prefixes_stripped():
    model = make_model()
    sd = model.state_dict()
    clean = state_dict_for_saving(sd)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        wrapped = state_dict_for_saving({prefix + k: v for k, v in sd.items()})
        assert wrapped.keys() == clean.keys()
        assert all(torch.equal(wrapped[k], clean[k]) for k in clean)
    assert "lm_head.weight" not in clean


def test_untied_lm_head_rejected():
    sd = dict(make_model().state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight"):
        state_dict_for_saving(sd)


def test_save_checks_config(tmp_path):
    model = make_model()
    wrong = GPTConfig(vocab_size=VOCAB + 1, block_size=32, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="transformer.wte.weight"):
        save_pretrained(tmp_path, model, wrong)


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_pickle_disguised_as_safetensors_refused(tmp_path, kind):
    model = make_model()
    save_pretrained(tmp_path, model, model.config)
    target = tmp_path / "model.safetensors"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # would create `marker` if anything unpickled the file
            return (open, (str(marker), "w"))

    if kind == "torch.save":
        torch.save({"x": Payload()}, target)
    else:
        target.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="safetensors"):
        load_pretrained(tmp_path)
    assert not marker.exists()


def test_garbage_file_refused(tmp_path):
    model = make_model()
    save_pretrained(tmp_path, model, model.config)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_pretrained(tmp_path)


def test_missing_files_named(tmp_path):
    model = make_model()
    save_pretrained(tmp_path, model, model.config)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_mismatched_keys_named(tmp_path):
    model = make_model()
    save_pretrained(tmp_path, model, model.config)
    tensors = state_dict_for_saving(model)
    tensors["transformer.extra.weight"] = torch.zeros(2)
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path)
    assert "transformer.extra.weight" in str(err.value) and "transformer.ln_f.bias" in str(
        err.value
    )


def test_load_uses_no_random_init(tmp_path, monkeypatch):
    """Loading builds on the meta device, so gpt2-sized checkpoints load without an init pass."""
    model = make_model()
    save_pretrained(tmp_path, model, model.config)
    calls = []
    monkeypatch.setattr(
        GPT,
        "_init_weights",
        staticmethod(lambda m: calls.extend(p.device.type for p in m.parameters(recurse=False))),
    )
    load_pretrained(tmp_path)
    assert calls and set(calls) == {"meta"}
