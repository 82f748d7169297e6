"""One small storage layer over local paths and ``s3://bucket/key`` URIs.

Everything that reads or writes datasets, tokenizers or checkpoints goes through here so
that a job runs the same against a laptop directory and an S3(-compatible) bucket.

The S3 endpoint is boto3's own ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) variable,
credentials and region the usual ``AWS_*`` variables / config files: nothing gptctl-specific.

One module per job: ``paths`` (which storage a URI names), ``clients`` (the cached boto3
clients), ``errors`` (what a failed call means), ``reads`` / ``reader`` (whole reads and the
resumable shard stream), ``writes`` (atomic writes, uploads), ``reachability`` (fail fast,
create the bucket). Callers use ``from workers import storage; storage.X``.
"""

from __future__ import annotations

from workers.storage.clients import s3_client
from workers.storage.errors import StorageError
from workers.storage.paths import is_s3, join, split_s3
from workers.storage.reachability import check_reachable, ensure_bucket
from workers.storage.reader import ResumableS3Reader, StreamCounters, open_stream
from workers.storage.reads import download_dir, download_file, exists, list_files, open_read, read_bytes, read_text
from workers.storage.writes import delete, upload_dir, upload_file, write_bytes, write_text

__all__ = [
    "StorageError",
    "is_s3",
    "split_s3",
    "join",
    "s3_client",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "exists",
    "list_files",
    "upload_file",
    "download_file",
    "upload_dir",
    "download_dir",
    "delete",
    "open_read",
    "open_stream",
    "ResumableS3Reader",
    "StreamCounters",
    "check_reachable",
    "ensure_bucket",
]
