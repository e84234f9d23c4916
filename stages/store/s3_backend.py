"""The `s3://` backend (boto3): versioned bucket, sha256 in object metadata, no-overwrite writes.

Publishing relies on S3's own atomicity: a PUT, a copy or a completed multipart upload appears
whole or not at all, and `If-None-Match: *` makes "create only if absent" one atomic step.
Large files are first streamed to a staging key (hashing every byte on the way), then
copied server-side to their key with the sha256 as metadata, so nothing unverified is ever
visible under a real key.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from ..base import settings
from ..base.errors import InputError
from .base import (
    CHUNK,
    ArtifactStore,
    HashingReader,
    ObjectInfo,
    check_expected,
    refuse_overwrite,
    replace_local,
    sha256_bytes,
    source_file,
)
from .errors import ArtifactNotFoundError, CredentialsRejectedError, StoreError, StoreUnavailableError
from .keys import RESERVED_PREFIX, validate_key, validate_prefix
from .uri import S3Location

MAX_ATTEMPTS = 3  # per request, first try included: a dead server fails in seconds, not minutes
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60  # a server-side copy of one part answers only when the part is copied
PART_SIZE = 8 * 1024 * 1024  # files this size and larger go through a multipart upload
COPY_PART_SIZE = 256 * 1024 * 1024
COPY_THREADS = 4
SHA256_METADATA = "sha256"
STAGING = f"{RESERVED_PREFIX}staging"
STALE_UPLOAD_S = 24 * 3600  # an unfinished multipart upload this old belongs to a writer that died
_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchVersion", "NoSuchBucket", "NotFound", "404"}


class S3Store(ArtifactStore):
    def __init__(
        self,
        location: S3Location,
        *,
        endpoint_url: str | None = None,
        part_size: int = PART_SIZE,
        copy_part_size: int = COPY_PART_SIZE,
        writable: bool = True,
    ):
        """Connect, create the bucket if it is missing, and make sure versioning is enabled.

        With `writable=False` (reading someone else's bucket, or auditing) the bucket is only
        checked to exist: nothing is created and its versioning setting is left alone.

        Endpoint: `endpoint_url`, else $SPECTRUM_S3_ENDPOINT_URL, else boto3's own resolution
        (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, config files, AWS). Region and credentials
        come from the standard AWS environment variables and config files.
        """
        endpoint_url = endpoint_url or settings.s3_endpoint()
        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise InputError(f"invalid S3 endpoint URL {endpoint_url!r}: expected http(s)://host[:port]")
            if parts.username is not None or parts.password is not None:  # it would show in every error message
                shown = f"{parts.scheme}://***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
                raise InputError(
                    f"the S3 endpoint URL {shown} holds credentials: give the endpoint as http(s)://host[:port] "
                    "and the credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)"
                )
        self.endpoint_url = endpoint_url  # as given or from $SPECTRUM_S3_ENDPOINT_URL (None: boto3 resolves it)
        self._bucket = location.bucket
        self._base = f"{location.prefix}/" if location.prefix else ""
        self._part_size = part_size
        self._copy_part_size = copy_part_size
        self._transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4)
        self._session = boto3.session.Session()
        self._client = self._session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=self._session.region_name or "us-east-1",
            config=Config(
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                # IP-address and localhost endpoints cannot host bucket subdomains.
                s3={"addressing_style": "path"} if endpoint_url else None,
            ),
        )
        self._endpoint = self._client.meta.endpoint_url
        self._open_bucket(writable)
        if writable:  # uploads of writers that were killed (SIGKILL, power loss) hold parts until aborted
            self.abort_uploads(self._base, older_than_s=STALE_UPLOAD_S)

    @property
    def root_uri(self) -> str:
        return f"s3://{self._bucket}/{self._base}"

    def uri(self, key: str) -> str:
        return f"s3://{self._bucket}/{self._full(key)}"

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        full, uri, digest = self._full(key), self.uri(key), sha256_bytes(data)
        with self._errors("writing", uri):
            try:
                response = self._client.put_object(
                    Bucket=self._bucket,
                    Key=full,
                    Body=data,
                    Metadata={SHA256_METADATA: digest},
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),  # the server verifies it
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if not _precondition_failed(exc):
                    raise
                return refuse_overwrite(self.info(key), digest)
        return ObjectInfo(key, uri, digest, len(data), response.get("VersionId"))

    def put_file(self, key: str, local_path: str | Path, *, sha256: str | None = None) -> ObjectInfo:
        source = source_file(local_path)
        uri = self.uri(key)
        if source.is_file() and source.stat().st_size < self._part_size:
            data = source.read_bytes()
            check_expected(f"reading {source}", sha256_bytes(data), len(data), sha256)
            return self.put_bytes(key, data)
        staging = f"{self._base}{STAGING}/{uuid.uuid4().hex}"
        staged_version = None
        with self._errors("writing", uri):
            try:
                with open(source, "rb") as handle:
                    reader = HashingReader(handle)
                    self._client.upload_fileobj(reader, self._bucket, staging, Config=self._transfer)
                staged = self._client.head_object(Bucket=self._bucket, Key=staging)
                staged_version = staged.get("VersionId")
                check_expected(f"uploading {source} to {uri}", reader.sha256, staged["ContentLength"], sha256, reader.size)
                return self._publish_copy(key, staging, staged_version, reader.sha256, reader.size)
            except BaseException:
                self.abort_uploads(staging)  # parts of an unfinished upload are stored (and billed) until aborted
                raise
            finally:
                self._discard(staging, staged_version)

    def abort_uploads(self, key_prefix: str, older_than_s: float | None = None) -> int:
        """Abort unfinished multipart uploads whose full key starts with `key_prefix` (best effort).

        With `older_than_s`, only those started that long ago (a writer that was killed); returns
        how many were aborted.
        """
        now = time.time()
        aborted = 0
        with suppress(ClientError, BotoCoreError):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self._bucket, Prefix=key_prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    if older_than_s is not None and initiated is not None and now - initiated.timestamp() < older_than_s:
                        continue
                    with suppress(ClientError, BotoCoreError):
                        self._client.abort_multipart_upload(Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                        aborted += 1
        return aborted

    def get_bytes(self, key: str, *, version_id: str | None = None) -> bytes:
        uri = self.uri(key)
        with self._errors("reading", uri):
            response = self._client.get_object(**self._object_args(key, version_id))
            data = response["Body"].read()
        expected = response["Metadata"].get(SHA256_METADATA)
        check_expected(f"reading {uri}", sha256_bytes(data), len(data), expected, response["ContentLength"])
        return data

    def download_file(
        self, key: str, local_path: str | Path, *, sha256: str | None = None, version_id: str | None = None
    ) -> ObjectInfo:
        uri = self.uri(key)
        head = self._head(key, version_id)
        recorded = head["Metadata"].get(SHA256_METADATA)
        if sha256 is not None and recorded is not None:
            check_expected(f"reading {uri}", recorded, head["ContentLength"], sha256)
        # Pin the version seen by the HEAD so the bytes and the recorded digest belong together.
        version = head.get("VersionId")

        def fill(handle: IO[bytes]) -> None:
            with self._errors("reading", uri):
                self._client.download_fileobj(
                    self._bucket,
                    self._full(key),
                    handle,
                    ExtraArgs={"VersionId": version} if version is not None else None,
                    Config=self._transfer,
                )

        def check(digest: str, size: int) -> None:
            check_expected(f"reading {uri}", digest, size, recorded or sha256, head["ContentLength"])

        digest, size = replace_local(Path(local_path), fill, check)
        return ObjectInfo(key, uri, digest, size, version)

    def exists(self, key: str) -> bool:
        with self._errors("checking", self.uri(key)):
            try:
                self._client.head_object(Bucket=self._bucket, Key=self._full(key))
            except ClientError as exc:
                if _status(exc) == 404:
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        keys = []
        with self._errors("listing", f"s3://{self._bucket}/{self._base}{prefix}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=self._base + prefix)
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"][len(self._base) :]
                    # Skip folder markers made by consoles, and the store's own staging objects.
                    if not key.endswith("/") and not any(p.startswith(RESERVED_PREFIX) for p in key.split("/")):
                        keys.append(key)
        return sorted(keys)

    def info(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        head = self._head(key, version_id)
        version = head.get("VersionId")
        digest = head["Metadata"].get(SHA256_METADATA) or self._hash_object(key, version)
        return ObjectInfo(key, self.uri(key), digest, head["ContentLength"], version)

    def arrow_filesystem(self) -> pafs.FileSystem:
        credentials = self._session.get_credentials()
        if credentials is None:
            raise CredentialsRejectedError(_NO_CREDENTIALS)
        frozen = credentials.get_frozen_credentials()
        endpoint = urlsplit(self._endpoint)
        return pafs.S3FileSystem(
            access_key=frozen.access_key,
            secret_key=frozen.secret_key,
            session_token=frozen.token,
            region=self._client.meta.region_name,
            endpoint_override=endpoint.netloc,
            scheme=endpoint.scheme,
            connect_timeout=CONNECT_TIMEOUT_S,
            request_timeout=READ_TIMEOUT_S,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        )

    def arrow_path(self, key: str) -> str:
        return f"{self._bucket}/{self._full(key)}"

    def _full(self, key: str) -> str:
        return self._base + validate_key(key)

    def _object_args(self, key: str, version_id: str | None) -> dict[str, Any]:
        args = {"Bucket": self._bucket, "Key": self._full(key)}
        if version_id is not None:
            args["VersionId"] = version_id
        return args

    def _head(self, key: str, version_id: str | None) -> dict[str, Any]:
        with self._errors("reading", self.uri(key)):
            return self._client.head_object(**self._object_args(key, version_id))

    def _hash_object(self, key: str, version_id: str | None) -> str:
        """The sha256 of an object written without the store (no sha256 metadata), by streaming it."""
        with self._errors("reading", self.uri(key)):
            body = self._client.get_object(**self._object_args(key, version_id))["Body"]
            reader = HashingReader(body)
            while reader.read(CHUNK):
                pass
        return reader.sha256

    def _open_bucket(self, writable: bool) -> None:
        """Check the bucket exists; a writable store creates it if missing and turns versioning on."""
        with self._errors("opening bucket", f"s3://{self._bucket}"):
            try:
                self._client.head_bucket(Bucket=self._bucket)
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
                if not writable:
                    raise ArtifactNotFoundError(f"bucket s3://{self._bucket} does not exist at {self._endpoint}; check the URI") from exc
                region = self._client.meta.region_name
                where = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
                with suppress(self._client.exceptions.BucketAlreadyOwnedByYou):
                    self._client.create_bucket(Bucket=self._bucket, **where)
            if writable and self._client.get_bucket_versioning(Bucket=self._bucket).get("Status") != "Enabled":
                self._client.put_bucket_versioning(
                    Bucket=self._bucket, VersioningConfiguration={"Status": "Enabled"}
                )

    def _publish_copy(self, key: str, staging: str, staged_version: str | None, digest: str, size: int) -> ObjectInfo:
        """Copy the verified staging object to `key` with its sha256 as metadata, unless `key` exists."""
        source = {"Bucket": self._bucket, "Key": staging}
        if staged_version is not None:
            source["VersionId"] = staged_version
        try:
            if size <= self._copy_part_size:
                version = self._client.copy_object(
                    Bucket=self._bucket,
                    Key=self._full(key),
                    CopySource=source,
                    Metadata={SHA256_METADATA: digest},
                    MetadataDirective="REPLACE",
                    IfNoneMatch="*",
                ).get("VersionId")
            else:
                version = self._multipart_copy(self._full(key), source, digest, size)
        except ClientError as exc:
            if not _precondition_failed(exc):
                raise
            return refuse_overwrite(self.info(key), digest)
        return ObjectInfo(key, self.uri(key), digest, size, version)

    def _multipart_copy(self, full: str, source: dict[str, str], digest: str, size: int) -> str | None:
        """A server-side copy in parts (CopyObject stops at 5 GiB); the object appears on completion."""
        upload = self._client.create_multipart_upload(
            Bucket=self._bucket, Key=full, Metadata={SHA256_METADATA: digest}
        )["UploadId"]

        def copy_part(numbered: tuple[int, int]) -> dict[str, Any]:
            number, start = numbered
            end = min(start + self._copy_part_size, size) - 1
            result = self._client.upload_part_copy(
                Bucket=self._bucket,
                Key=full,
                UploadId=upload,
                PartNumber=number,
                CopySource=source,
                CopySourceRange=f"bytes={start}-{end}",
            )
            return {"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]}

        try:
            with ThreadPoolExecutor(COPY_THREADS) as pool:
                parts = list(pool.map(copy_part, enumerate(range(0, size, self._copy_part_size), start=1)))
            return self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=full, UploadId=upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            ).get("VersionId")
        except BaseException:
            with suppress(ClientError, BotoCoreError):
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload)
            raise

    def _discard(self, staging: str, version_id: str | None) -> None:
        """Best-effort removal of a staging object (deleting by version removes it for good)."""
        args = {"Bucket": self._bucket, "Key": staging}
        if version_id is not None:
            args["VersionId"] = version_id
        with suppress(ClientError, BotoCoreError):
            self._client.delete_object(**args)

    @contextmanager
    def _errors(self, action: str, uri: str) -> Iterator[None]:
        """Turn boto errors into SpectrumErrors that name the endpoint and never a credential."""
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = _status(exc)
            if code in _CREDENTIAL_CODES or status == 403:
                raise CredentialsRejectedError(
                    f"the S3 credentials were rejected by {self._endpoint} while {action} {uri} ({code or status}): "
                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
                ) from exc
            if code in _MISSING_CODES or status == 404:
                raise ArtifactNotFoundError(f"{uri} does not exist at {self._endpoint} ({code or status})") from exc
            message = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(f"S3 {action} {uri} failed at {self._endpoint}: {code or status} {message}".rstrip()) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise CredentialsRejectedError(_NO_CREDENTIALS) from exc
        except (BotoConnectionError, HTTPClientError, RetriesExceededError) as exc:
            raise StoreUnavailableError(
                f"cannot reach the S3 endpoint {self._endpoint} while {action} {uri} "
                f"(gave up after {MAX_ATTEMPTS} attempts: {exc}); check that the server is running "
                f"and that the endpoint URL (endpoint_url, ${settings.S3_ENDPOINT_ENV} or AWS_ENDPOINT_URL) is right"
            ) from exc


_NO_CREDENTIALS = "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _precondition_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "PreconditionFailed" or _status(exc) == 412

