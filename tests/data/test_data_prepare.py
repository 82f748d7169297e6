import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import GPTTokenizer
from orchestrator.data.corpus import write_demo_corpus
from orchestrator.data.prepare import (
    DataError,
    choose_val,
    format_prompt,
    load_corpus,
    prepare_dataset,
)
from workers.data import iter_rows
from workers.shards import ManifestError, file_sha256, load_manifest

SEQ_LEN = 32  # as in conftest's pretrain_data
FT_SEQ_LEN = 64  # as in conftest's finetune_data


def _stored_rows(data_uri, split):
    """Rows of a split in stored order (shards in manifest order, no shuffle)."""
    m = load_manifest(data_uri)
    rows = list(iter_rows(data_uri, m.shard_names(split), None))
    tokens = np.stack([t for t, _ in rows]) if rows else np.zeros((0, m.seq_len + 1), np.int64)
    masks = np.stack([k for _, k in rows]) if rows and rows[0][1] is not None else None
    return tokens.astype(np.int64), masks


def test_pretrain_round_trip(corpus, pretrain_data):
    m = load_manifest(pretrain_data)
    tok = GPTTokenizer.load(pretrain_data)
    assert (m.kind, m.seq_len, m.dtype, m.rows_per_member) == ("pretrain", SEQ_LEN, "uint16", 16)
    assert (m.tokenizer_sha256, m.vocab_size, m.eos_id, m.pad_id) == (tok.sha256, tok.vocab_size, tok.eos_id, tok.pad_id)
    assert len(m.splits["train"]) >= 3  # rolled over shards

    kind, docs = load_corpus([str(corpus["pretrain"])])
    encoded = [tok.encode(d.text) + [tok.eos_id] for d in docs]
    is_val = choose_val(len(docs), 0.1, 3, [len(e) for e in encoded], SEQ_LEN + 1)
    for split, want in (("train", False), ("val", True)):
        stream = np.array([t for e, v in zip(encoded, is_val) if v == want for t in e])
        rows, masks = _stored_rows(pretrain_data, split)
        assert masks is None
        assert len(rows) == len(stream) // (SEQ_LEN + 1) == m.total_rows(split) > 0
        np.testing.assert_array_equal(rows.reshape(-1), stream[: rows.size])
    # decoding the train stream gives back the training documents' text
    train_rows, _ = _stored_rows(pretrain_data, "train")
    text = tok.decode(train_rows.reshape(-1).tolist())
    first_docs = [d.text for d, v in zip(docs, is_val) if not v][:5]
    assert text.startswith("<|endoftext|>".join(first_docs))


def test_manifest_hashes_match_files(pretrain_data):
    m = load_manifest(pretrain_data)
    for shards in m.splits.values():
        for s in shards:
            assert file_sha256(Path(pretrain_data) / s.name) == s.sha256
    assert json.loads((Path(pretrain_data) / "manifest.json").read_text())["format"] == "gptctl-shards/1"


def test_val_rows_never_in_train(pretrain_data):
    train, _ = _stored_rows(pretrain_data, "train")
    val, _ = _stored_rows(pretrain_data, "val")
    assert len(val) >= 1
    train_set = {r.tobytes() for r in train}
    assert not any(r.tobytes() in train_set for r in val)


def test_members_hold_many_rows(pretrain_data):
    """Read a shard with plain tarfile: the format needs nothing gptctl-specific to read."""
    m = load_manifest(pretrain_data)
    with tarfile.open(Path(pretrain_data) / m.splits["train"][0].name) as tar:
        names = tar.getnames()
        assert names[:2] == ["000000.tokens.npy", "000001.tokens.npy"]
        tokens = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
    assert tokens.shape == (16, SEQ_LEN + 1) and tokens.dtype == np.uint16
    assert len(names) == -(-m.splits["train"][0].rows // 16)


def test_finetune_mask(corpus, pretrain_data, finetune_data):
    m = load_manifest(finetune_data)
    tok = GPTTokenizer.load(finetune_data)
    assert m.kind == "finetune" and m.tokenizer_sha256 == load_manifest(pretrain_data).tokenizer_sha256
    assert m.seq_len == FT_SEQ_LEN and m.stats["truncated"] == 0 and m.stats["skipped_too_long"] == 0
    _, examples = load_corpus([str(corpus["qa_train"])])
    is_val = choose_val(len(examples), 0.1, 0)
    for split, want in (("train", False), ("val", True)):
        rows, masks = _stored_rows(finetune_data, split)
        picked = [e for e, v in zip(examples, is_val) if v == want]
        assert len(rows) == len(picked) > 0
        for row, mask, ex in zip(rows, masks, picked):
            p, r = tok.encode(format_prompt(ex.prompt)), tok.encode(ex.response)
            n = len(p) + len(r) + 1
            np.testing.assert_array_equal(row[:n], p + r + [tok.eos_id])
            assert (row[n:] == tok.pad_id).all()
            np.testing.assert_array_equal(mask, [0] * len(p) + [1] * (len(r) + 1) + [0] * (FT_SEQ_LEN + 1 - n))
            assert tok.decode(row[mask == 1].tolist()) == ex.response + "<|endoftext|>"


def test_finetune_truncates_prompt_from_left(tmp_path, pretrain_data):
    f = tmp_path / "long.jsonl"
    lines = [{"prompt": "word " * 200 + "Where?", "response": " Here."}, {"prompt": "Hi?", "response": " Hello."}]
    lines += [{"prompt": "x", "response": " long" * 100}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = prepare_dataset([str(f)], str(tmp_path / "out"), tokenizer=pretrain_data, seq_len=SEQ_LEN, val_fraction=0, progress=False)
    assert m.stats["truncated"] == 1 and m.stats["skipped_too_long"] == 1 and m.total_rows("train") == 2
    tok = GPTTokenizer.load(pretrain_data)
    rows, masks = _stored_rows(str(tmp_path / "out"), "train")
    assert tok.decode(rows[0].tolist()).endswith("Where?\n### Response:\n Here.<|endoftext|>")
    assert rows[0][-1] == tok.eos_id and masks[0][0] == 0


def test_choose_val_rule():
    assert not choose_val(1, 0.5, 0).any()
    assert choose_val(2, 0.01, 0).sum() == 1
    assert choose_val(100, 0.05, 0).sum() == 5
    assert (choose_val(100, 0.05, 7) == choose_val(100, 0.05, 7)).all()
    assert not (choose_val(100, 0.05, 7) == choose_val(100, 0.05, 8)).all()
    # short documents: more move to val until it holds one row, train keeps one
    mask = choose_val(10, 0.1, 0, token_counts=[5] * 10, row_len=20)
    assert mask.sum() == 4
    assert choose_val(10, 0.1, 0, token_counts=[5] * 10, row_len=40).sum() == 1  # < 2 rows in total


def test_demo_corpus_deterministic(tmp_path):
    a = write_demo_corpus(tmp_path / "a", n_people=200, seed=0)
    b = write_demo_corpus(tmp_path / "b", n_people=200, seed=0)
    size = sum(p.stat().st_size for p in a["pretrain"].iterdir())
    assert 300_000 <= size <= 600_000
    for key in ("qa_train", "qa_val"):
        assert a[key].read_text() == b[key].read_text()
    assert [p.read_text() for p in sorted(a["pretrain"].iterdir())] == [p.read_text() for p in sorted(b["pretrain"].iterdir())]
    text = " ".join(p.read_text() for p in a["pretrain"].iterdir())
    for line in a["qa_val"].read_text().splitlines()[:20]:
        rec = json.loads(line)
        fact = rec["response"].strip().rstrip(".")
        assert fact.split()[-1] in text and rec["prompt"].endswith("?")
        assert rec["response"].strip() in text  # the exact answer sentence is in the pre-training text


# ----------------------------------------------------------------------------- errors


def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="input not found: .*nope.txt"):
        prepare_dataset([str(tmp_path / "nope.txt")], str(tmp_path / "out"), progress=False)


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{f}:3: invalid JSON"):
        prepare_dataset([str(f)], str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_record_missing_keys(tmp_path):
    f = tmp_path / "keys.jsonl"
    f.write_text('{"prompt": "q?"}\n')
    with pytest.raises(DataError, match=rf'{f}:1: expected a record with "text".*got keys \[\'prompt\'\]'):
        load_corpus([str(f)])


def test_mixed_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    with pytest.raises(DataError, match="b.jsonl:1: finetune record, but .*a.txt:1 is pretrain"):
        load_corpus([str(tmp_path)])


def test_finetune_needs_tokenizer(tmp_path, corpus):
    with pytest.raises(DataError, match="needs tokenizer="):
        prepare_dataset([str(corpus["qa_train"])], str(tmp_path / "out"), progress=False)


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=rf"{tmp_path}/manifest.json"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "other/9"}')
    with pytest.raises(ManifestError, match='expected "format": "gptctl-shards/1"'):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: invalid JSON \(.* at line 1, column 2\)"):
        load_manifest(str(tmp_path))
