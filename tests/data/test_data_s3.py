import itertools

import torch

from orchestrator.data.prepare import prepare_dataset
from workers import storage
from workers.data import eval_batches, train_batches
from workers.shards import load_manifest



def test_prepare_to_s3_and_stream(s3_endpoint, corpus, tmp_path):
    uri = "s3://gptctl-data/datasets/demo"
    storage.ensure_bucket(uri)
    m = prepare_dataset(
        [str(corpus["pretrain"])], uri, vocab_size=400, seq_len=32,
        val_fraction=0.1, rows_per_shard=100, rows_per_member=16, seed=3, progress=False,
    )
    assert storage.list_files(uri)[-1].endswith("val-000000.tar")
    loaded = load_manifest(uri)
    assert loaded == m
    local = tmp_path / "copy"
    storage.download_dir(uri, local)
    names = loaded.shard_names("train")
    from_s3 = list(itertools.islice(train_batches(uri, names, 8, seed=1, start_batch=5), 30))
    from_disk = list(itertools.islice(train_batches(str(local), names, 8, seed=1, start_batch=5), 30))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(from_s3, from_disk)) and len(from_s3) == 30
    v = eval_batches(uri, loaded.shard_names("val"), 4, 3)
    assert len(v) == 3


def test_prepare_from_s3_inputs(s3_endpoint, corpus, pretrain_data):
    storage.ensure_bucket("s3://gptctl-data")
    storage.upload_file(corpus["qa_train"], "s3://gptctl-data/raw/qa/qa_train.jsonl")
    storage.upload_dir(pretrain_data, "s3://gptctl-data/ckpt")
    m = prepare_dataset(["s3://gptctl-data/raw/qa"], "s3://gptctl-data/ft", tokenizer="s3://gptctl-data/ckpt",
                        seq_len=64, progress=False)
    assert m.kind == "finetune" and m.total_rows("train") > 0
    assert m.tokenizer_sha256 == load_manifest(pretrain_data).tokenizer_sha256
