"""The S3 backend's multipart uploads: a failed or abandoned upload is aborted, not left stored (and billed)."""

from __future__ import annotations

import os

import pytest

from stages.base.errors import SpectrumError


@pytest.mark.integration
def test_unfinished_s3_uploads_are_aborted(s3_env, tmp_path, monkeypatch):
    """A writer killed mid-upload leaves parts that are stored (and billed) until aborted."""
    from stages.store import parse_store_uri, s3_backend
    from stages.store.s3_backend import S3Store

    from .s3_server import fresh_bucket

    mib = 1024 * 1024
    location = parse_store_uri(f"s3://{fresh_bucket()}/p")
    store = S3Store(location, part_size=5 * mib, copy_part_size=5 * mib)
    client, bucket = store._client, store._bucket

    # a failed upload of this writer is aborted at once
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(11 * mib))
    real_complete = client.complete_multipart_upload
    client.complete_multipart_upload = lambda **kwargs: (_ for _ in ()).throw(OSError("connection reset"))
    try:
        with pytest.raises((OSError, SpectrumError)):
            store.put_file("drops/big.bin", source)
    finally:
        client.complete_multipart_upload = real_complete
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.list("drops/") == []

    # the upload of a writer that was killed (here: begun and never finished) ...
    upload = client.create_multipart_upload(Bucket=bucket, Key="p/.spectrum-staging/killed-writer")["UploadId"]
    client.upload_part(Bucket=bucket, Key="p/.spectrum-staging/killed-writer", UploadId=upload, PartNumber=1, Body=b"x" * 1024)
    # ... is left alone while it may still be running,
    S3Store(location)
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [upload]
    # ... and aborted by the next writer once it is older than a writer can live
    monkeypatch.setattr(s3_backend, "STALE_UPLOAD_S", 0)
    S3Store(location)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
