"""The filesystem Ray Train uploads checkpoints through (orchestrator.ray_runtime.train_storage).

Ray's async upload already runs beside training; the worker must not also hold the whole
checkpoint file in memory while the network catches up with the disk.
"""
from __future__ import annotations

import hashlib
import os

import boto3
import pytest

from bench.checkpoint_upload import upload_once
from workers import storage

pytestmark = pytest.mark.integration


def _uploaded_digest(key: str) -> bytes:
    body = boto3.client("s3").get_object(Bucket="upload-memory", Key=key)["Body"].read()
    return hashlib.sha256(body).digest()


def test_checkpoint_upload_holds_a_chunk_not_the_whole_file(s3_endpoint, tmp_path):
    storage.ensure_bucket("s3://upload-memory")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    payload = os.urandom(64 << 20)
    (checkpoint / "model.safetensors").write_bytes(payload)

    # 8 MB chunks instead of Ray's 64 MB, so that a 64 MB file shows the bound
    _, _, peak_bytes = upload_once(checkpoint, "s3://upload-memory/runs/bounded", "bounded", chunk_bytes=8 << 20)
    # one 8 MB chunk read ahead plus one ~10 MB multipart part; with pyarrow's background writes
    # the chunks read faster than they upload pile up (~64-78 MB for this file)
    assert peak_bytes < 32 << 20, f"upload held {peak_bytes >> 20} MB of a 64 MB file in memory"
    assert _uploaded_digest("runs/bounded/model.safetensors") == hashlib.sha256(payload).digest()

    # train.checkpoint_upload: parallel (pyarrow's background writes) uploads the same bytes
    upload_once(checkpoint, "s3://upload-memory/runs/parallel", "parallel", chunk_bytes=8 << 20)
    assert _uploaded_digest("runs/parallel/model.safetensors") == hashlib.sha256(payload).digest()
