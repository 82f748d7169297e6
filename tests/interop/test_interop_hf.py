"""Hugging Face GPT-2 export/import: transformers loads the export offline, logits match, and
gptctl -> HF -> gptctl is bit-identical."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from interop_testutil import TEXT, tensors_equal, tiny_config

from model import GPTTokenizer, SamplingParams, generate, load_pretrained
from model.hf import HFFormatError, gpt_config_from_hf, hf_config_dict
from orchestrator.cli import interop as cli_interop
from orchestrator.registry.export import export_hf, import_hf, is_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("hf")
    export_hf(str(checkpoint), str(out))
    return out


def _hf_model(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
    return model.eval()


def test_export_writes_a_gpt2_directory(exported, checkpoint):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (exported / name).is_file(), name
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["n_positions"] == 32 and config["vocab_size"] == load_pretrained(checkpoint).config.vocab_size
    assert not list(exported.glob("*.py")), "no custom code"


def test_transformers_loads_export_offline_and_logits_match(exported, checkpoint):
    hf = _hf_model(exported)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "tied LM head"
    ours = load_pretrained(checkpoint)
    tokenizer = GPTTokenizer.load(checkpoint)
    ids = torch.tensor([tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        expected, _ = ours(ids)
        got = hf(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_transformers_tokenizer_matches_gptctl(exported, checkpoint):
    ours = GPTTokenizer.load(checkpoint)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    for text in (TEXT, "  leading spaces\tand tabs\n", "中文字符 🙂🚀"):
        assert hf_tok(text)["input_ids"] == ours.encode(text), text
        assert hf_tok.decode(ours.encode(text)) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == ours.eos_id
    assert hf_tok.pad_token == "<|pad|>" and hf_tok.pad_token_id == ours.pad_id


def test_greedy_generation_matches_transformers(exported, checkpoint):
    ours = load_pretrained(checkpoint)
    tokenizer = GPTTokenizer.load(checkpoint)
    prompt = tokenizer.encode("Alice lives in")
    new = generate(ours, prompt, SamplingParams(max_new_tokens=10, temperature=0.0))
    hf = _hf_model(exported)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=len(new), do_sample=False, use_cache=True,
                      eos_token_id=None)
    assert out[0, len(prompt):].tolist() == new


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_is_bit_identical(tmp_path, bias, checkpoint, checkpoint_no_bias):
    source = checkpoint if bias else checkpoint_no_bias
    export_hf(str(source), str(tmp_path / "hf"))
    assert is_hf_checkpoint(str(tmp_path / "hf")) and not is_hf_checkpoint(str(source))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert tensors_equal(source / "model.safetensors", tmp_path / "back" / "model.safetensors")
    for name in ("config.json", "tokenizer.json"):
        assert (source / name).read_bytes() == (tmp_path / "back" / name).read_bytes(), name


def test_bias_free_export_matches_in_transformers(tmp_path, checkpoint_no_bias):
    export_hf(str(checkpoint_no_bias), str(tmp_path))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected, _ = load_pretrained(checkpoint_no_bias)(ids)
        got = _hf_model(tmp_path)(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def _gpt2_like_dir(directory: Path, tokenizer_vocab: int, rows: int) -> tuple[Path, object]:
    """A directory written by transformers itself, with a GPT-2 style tokenizer: <|endoftext|> only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from interop_testutil import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=tokenizer_vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=rows, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(str(directory), safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory, model


def test_import_transformers_written_dir_adds_pad_in_spare_row(tmp_path):
    directory, hf = _gpt2_like_dir(tmp_path / "hf", tokenizer_vocab=300, rows=320)
    n_tokens = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    import_hf(str(directory), str(tmp_path / "ours"))
    tokenizer = GPTTokenizer.load(tmp_path / "ours")
    assert tokenizer.pad_id == n_tokens and tokenizer.eos_id == 0
    ours = load_pretrained(tmp_path / "ours")
    assert ours.config.vocab_size == 320, "a spare row was there: no resize"
    ids = torch.tensor([tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4


def test_import_without_room_for_pad_resizes_or_refuses(tmp_path):
    directory, hf = _gpt2_like_dir(tmp_path / "hf", tokenizer_vocab=300, rows=300)
    with pytest.raises(HFFormatError, match="resize_embeddings"):
        import_hf(str(directory), str(tmp_path / "refused"), resize_embeddings=False)
    assert not (tmp_path / "refused" / "model.safetensors").exists()
    import_hf(str(directory), str(tmp_path / "ours"))
    ours, tokenizer = load_pretrained(tmp_path / "ours"), GPTTokenizer.load(tmp_path / "ours")
    assert ours.config.vocab_size == 320 and tokenizer.pad_id == 300
    ids = torch.tensor([tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        got = ours(ids)[0]
        assert (got[..., :300] - hf(ids).logits).abs().max().item() < 1e-4, "old vocabulary unchanged"


def test_import_slow_tokenizer_files(tmp_path, exported):
    """vocab.json + merges.txt (no tokenizer.json) builds the same byte-level BPE."""
    import shutil

    from tokenizers import Tokenizer

    directory = tmp_path / "slow"
    shutil.copytree(exported, directory)
    Tokenizer.from_file(str(directory / "tokenizer.json")).model.save(str(directory))
    (directory / "tokenizer.json").unlink()
    import_hf(str(directory), str(tmp_path / "ours"))
    original = GPTTokenizer.load(exported)
    imported = GPTTokenizer.load(tmp_path / "ours")
    assert imported.encode(TEXT) == original.encode(TEXT)
    assert (imported.eos_id, imported.pad_id) == (original.eos_id, original.pad_id)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu"}, "activation_function"),
    ({"n_inner": 100}, "n_inner"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "only GPT-2"),
])
def test_unrepresentable_configs_are_refused(tokenizer, change, message):
    config = hf_config_dict(tiny_config(tokenizer), 0, 1)
    assert gpt_config_from_hf(config) == tiny_config(tokenizer)
    with pytest.raises(HFFormatError, match=message):
        gpt_config_from_hf({**config, **change})


def test_import_refuses_a_gptctl_checkpoint(tmp_path, checkpoint):
    with pytest.raises(HFFormatError, match="not a Hugging Face GPT-2"):
        import_hf(str(checkpoint), str(tmp_path / "x"))


def test_export_and_import_through_s3(s3_endpoint, tmp_path, checkpoint):
    from workers import storage

    storage.ensure_bucket("s3://interop")
    storage.upload_dir(str(checkpoint), "s3://interop/ckpt")
    export_hf("s3://interop/ckpt", "s3://interop/hf")
    assert storage.exists("s3://interop/hf/model.safetensors")
    assert is_hf_checkpoint("s3://interop/hf")
    import_hf("s3://interop/hf", str(tmp_path / "back"))
    assert tensors_equal(checkpoint / "model.safetensors", tmp_path / "back" / "model.safetensors")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gptctl")
    cli_interop.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_export(tmp_path, checkpoint, capsys):
    assert _cli(["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert is_hf_checkpoint(str(tmp_path / "hf"))
    assert _cli(["export", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
    assert _cli(["export", str(tmp_path / "hf"), "--format", "gptctl", "--out", str(tmp_path / "back")]) == 0
    assert tensors_equal(checkpoint / "model.safetensors", tmp_path / "back" / "model.safetensors")
    assert _cli(["export", str(checkpoint), "--format", "gptctl", "--out", str(tmp_path / "z")]) == 2
    assert "not a Hugging Face GPT-2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "y")])
