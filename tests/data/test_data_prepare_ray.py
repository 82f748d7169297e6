"""prepare_dataset(engine="ray"): Ray Data tokenization gives byte-identical shards."""

import pytest

from orchestrator.data.prepare import DataError, prepare_dataset
from workers.shards import load_manifest


def _same_output(a: str, b: str) -> None:
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma.splits == mb.splits, "same shard names, row counts and sha256 (hence bytes)"
    assert ma.stats == mb.stats and ma.tokenizer_sha256 == mb.tokenizer_sha256


def test_ray_engine_matches_local(ray_cluster, corpus, pretrain_data, tmp_path, capsys):
    kwargs = dict(vocab_size=400, seq_len=32, val_fraction=0.1, rows_per_shard=100, rows_per_member=16, seed=3)
    prepare_dataset([str(corpus["pretrain"])], str(tmp_path / "pre"), engine="ray", progress=True, **kwargs)
    _same_output(pretrain_data, str(tmp_path / "pre"))
    assert "tok_per_s" in capsys.readouterr().err, "progress bar shows tokens/s"
    ft = dict(tokenizer=pretrain_data, seq_len=64, val_fraction=0.1, rows_per_shard=64, rows_per_member=16, seed=0,
              progress=False)
    prepare_dataset([str(corpus["qa_train"])], str(tmp_path / "ft_local"), **ft)
    prepare_dataset([str(corpus["qa_train"])], str(tmp_path / "ft_ray"), engine="ray", **ft)
    _same_output(str(tmp_path / "ft_local"), str(tmp_path / "ft_ray"))


def test_unknown_engine(tmp_path, corpus):
    with pytest.raises(DataError, match="engine must be one of"):
        prepare_dataset([str(corpus["pretrain"])], str(tmp_path / "x"), engine="spark", progress=False)
