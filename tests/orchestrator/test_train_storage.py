"""The filesystem Ray Train uploads checkpoints through (orchestrator.ray_runtime.train_storage).

Ray's async upload already runs beside training; the worker must not also hold the whole
checkpoint file in memory while the network catches up with the disk.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from workers import storage

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# Uploads one directory the way Ray Train does (pyarrow.fs.copy_files, one thread, fixed-size
# chunks) in a fresh process, so pyarrow's memory pool has seen nothing else; prints its peak.
UPLOAD = """
import sys
import pyarrow
import pyarrow.fs
from orchestrator.ray_runtime import train_storage

path, filesystem = train_storage(sys.argv[2], parallel_parts=sys.argv[3] == "parallel")
pyarrow.fs.copy_files(sys.argv[1], path, destination_filesystem=filesystem, use_threads=False,
                      chunk_size=8 << 20)
print(pyarrow.default_memory_pool().max_memory())
"""


def _upload(directory: Path, uri: str, mode: str) -> int:
    """Upload in a fresh process; pyarrow's peak memory in bytes."""
    done = subprocess.run([sys.executable, "-c", UPLOAD, str(directory), uri, mode],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    return int(done.stdout.split()[-1])


def _uploaded_digest(key: str) -> bytes:
    body = boto3.client("s3").get_object(Bucket="upload-memory", Key=key)["Body"].read()
    return hashlib.sha256(body).digest()


def test_checkpoint_upload_holds_a_chunk_not_the_whole_file(s3_endpoint, tmp_path):
    storage.ensure_bucket("s3://upload-memory")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    payload = os.urandom(64 << 20)
    (checkpoint / "model.safetensors").write_bytes(payload)

    peak_bytes = _upload(checkpoint, "s3://upload-memory/runs/bounded", "bounded")
    # one 8 MB chunk read ahead plus one ~10 MB multipart part; with pyarrow's background writes
    # the chunks read faster than they upload pile up (~64-78 MB for this file)
    assert peak_bytes < 32 << 20, f"upload held {peak_bytes >> 20} MB of a 64 MB file in memory"
    assert _uploaded_digest("runs/bounded/model.safetensors") == hashlib.sha256(payload).digest()

    # train.checkpoint_upload: parallel (pyarrow's background writes) uploads the same bytes
    _upload(checkpoint, "s3://upload-memory/runs/parallel", "parallel")
    assert _uploaded_digest("runs/parallel/model.safetensors") == hashlib.sha256(payload).digest()
