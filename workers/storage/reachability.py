"""Fail fast when an S3 URI's endpoint or bucket is unusable; create a missing bucket."""
from __future__ import annotations

import os

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from workers.storage import clients
from workers.storage.errors import StorageError, _BucketMissing, _error_code, _no_credentials
from workers.storage.paths import is_s3, split_s3


def check_reachable(uri: str | os.PathLike) -> None:
    """Fail fast (~2 s) with a clear message if an S3 URI's endpoint or bucket is unusable."""
    if not is_s3(uri):
        return
    bucket, _ = split_s3(uri)
    client = clients._fast_client()
    endpoint = clients._endpoint(client)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = _error_code(exc)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise _BucketMissing(
                f"S3 bucket {bucket!r} does not exist at {endpoint} (needed for {uri}); create it first"
            ) from exc
        if code in ("403", "AccessDenied"):
            raise StorageError(
                f"access denied to S3 bucket {bucket!r} at {endpoint} (needed for {uri}); check AWS credentials"
            ) from exc
        raise StorageError(f"S3 endpoint {endpoint} refused bucket {bucket!r} for {uri}: {exc}") from exc
    except NoCredentialsError as exc:
        raise _no_credentials(str(uri)) from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot reach S3 endpoint {endpoint} for {uri}: {exc}") from exc


def ensure_bucket(uri: str | os.PathLike) -> None:
    """Create the URI's bucket if it does not exist yet (tests, demo, loopback endpoints)."""
    try:
        check_reachable(uri)
        return
    except _BucketMissing:
        pass
    bucket, _ = split_s3(str(uri))
    client = clients.s3_client()
    kwargs: dict = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StorageError(f"cannot create S3 bucket {bucket!r} at {clients._endpoint()}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot create S3 bucket {bucket!r} at {clients._endpoint()}: {exc}") from exc
