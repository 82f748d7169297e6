"""The errors storage raises, and what a failed boto3 call means for a URI: a message that
names the URI and what was expected instead of botocore's own."""
from __future__ import annotations

from botocore.exceptions import ClientError, NoCredentialsError

from workers.storage import clients


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what was expected."""


class _BucketMissing(StorageError):
    """check_reachable found the endpoint but not the bucket (ensure_bucket creates it)."""


def _no_credentials(uri: str) -> StorageError:
    return StorageError(
        f"{uri}: no AWS credentials found (expected AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)"
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_error(uri: str, action: str, exc: Exception) -> StorageError:
    if isinstance(exc, NoCredentialsError):
        return _no_credentials(uri)
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object (expected an existing file to {action})")
        if code in ("NoSuchBucket",):
            # uri is a valid s3:// URI by now; paths.split_s3 itself raises StorageError (an import cycle)
            bucket = uri[len("s3://") :].partition("/")[0]
            return StorageError(f"{uri}: bucket {bucket!r} does not exist at {clients._endpoint()}")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied while trying to {action} ({code}); check AWS credentials")
    return StorageError(f"{uri}: failed to {action} via S3 endpoint {clients._endpoint()}: {exc}")
