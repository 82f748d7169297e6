import time

import pytest

from infra.s3_endpoint import free_port
from workers import storage
from workers.storage import StorageError


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    assert storage.join("s3://bucket/pre/", "x", "/y.json") == "s3://bucket/pre/x/y.json"
    assert storage.join("/data/ds", "manifest.json") == "/data/ds/manifest.json"
    for bad in ("s3://", "s3:///key", "/local/path", "gs://b/k"):
        with pytest.raises(StorageError, match="expected an s3://bucket/key"):
            storage.split_s3(bad)


def test_local_roundtrip(tmp_path):
    target = tmp_path / "a" / "b" / "f.txt"
    storage.write_text(str(target), "hello")
    assert storage.read_text(str(target)) == "hello"
    assert storage.exists(str(target)) and storage.exists(str(tmp_path / "a"))
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temp file left
    storage.write_bytes(str(tmp_path / "a" / "g.bin"), b"\x00\x01")
    assert storage.list_files(str(tmp_path / "a")) == [str(tmp_path / "a/b/f.txt"), str(tmp_path / "a/g.bin")]
    storage.download_dir(str(tmp_path / "a"), str(tmp_path / "copy"))
    assert storage.read_bytes(str(tmp_path / "copy" / "g.bin")) == b"\x00\x01"
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.txt"))
    storage.check_reachable(str(tmp_path))  # local: no-op


def test_s3_roundtrip(s3_endpoint, tmp_path):
    uri = "s3://storage-test/run1"
    storage.ensure_bucket(uri)
    storage.ensure_bucket(uri)  # idempotent
    storage.check_reachable(uri)
    storage.write_text(storage.join(uri, "a.txt"), "hi")
    storage.write_bytes(storage.join(uri, "sub", "b.bin"), b"xyz")
    assert storage.read_text(uri + "/a.txt") == "hi"
    assert storage.list_files(uri) == [uri + "/a.txt", uri + "/sub/b.bin"]
    assert storage.exists(uri) and storage.exists(uri + "/sub/b.bin") and not storage.exists(uri + "/nope")
    assert storage.open_read(uri + "/sub/b.bin").read() == b"xyz"
    storage.download_dir(uri, tmp_path / "dl")
    assert (tmp_path / "dl" / "sub" / "b.bin").read_bytes() == b"xyz"
    storage.upload_dir(tmp_path / "dl", "s3://storage-test/copy")
    assert storage.read_bytes("s3://storage-test/copy/sub/b.bin") == b"xyz"
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes(uri + "/missing")
    with pytest.raises(StorageError, match="'no-such-bucket'"):
        storage.check_reachable("s3://no-such-bucket/x")


def test_unreachable_endpoint_fails_fast(monkeypatch):
    port = free_port()  # nothing listens there once the probe socket is closed
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.check_reachable("s3://bucket/prefix")
    assert time.monotonic() - start < 5
    assert f"cannot reach S3 endpoint {url} for s3://bucket/prefix" in str(info.value)
