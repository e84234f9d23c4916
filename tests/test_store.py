"""The artifact store: the same behaviour on `file://` and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.base.errors import InputError, OutputExistsError
from stages.store import (
    ArtifactNotFoundError,
    CredentialsRejectedError,
    IntegrityError,
    StoreUnavailableError,
    commit_manifest,
    list_runs,
    load_manifest,
    open_store,
    output_key,
    parse_store_uri,
    read_table,
    start_manifest,
    write_table,
)
from stages.store.s3_backend import S3Store
from tests.s3_server import free_ports, fresh_bucket, use_s3_server

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bucket_and_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


# --- round trips -------------------------------------------------------------------------


def test_bytes_round_trip(store):
    info = store.put_bytes("runs/r1/scan/result.json", b'{"ok": true}')

    assert info.key == "runs/r1/scan/result.json"
    assert info.uri == store.uri(info.key) and info.uri.startswith(store.root_uri)
    assert (info.sha256, info.size) == (sha256(b'{"ok": true}'), 12)
    assert store.get_bytes(info.key) == b'{"ok": true}'
    assert store.exists(info.key) and not store.exists("runs/r1/scan/other.json")
    assert store.info(info.key) == info


def test_large_file_round_trip_streams_and_verifies(store, tmp_path):
    """20 MiB crosses the S3 multipart threshold (8 MiB parts)."""
    source = random_file(tmp_path / "shard.safetensors", 20 * MiB + 123)
    digest = sha256(source.read_bytes())

    info = store.put_file("models/m/shard.safetensors", source, sha256=digest)
    fetched = store.download_file(info.key, tmp_path / "out" / "shard.safetensors", sha256=digest)

    assert (info.sha256, info.size) == (digest, 20 * MiB + 123)
    assert fetched.sha256 == digest
    assert (tmp_path / "out" / "shard.safetensors").read_bytes() == source.read_bytes()
    assert store.info(info.key).sha256 == digest
    assert store.list("models/") == ["models/m/shard.safetensors"]


def test_small_file_and_empty_file(store, tmp_path):
    small = store.put_file("a/config.json", random_file(tmp_path / "config.json", 1000))
    empty = store.put_file("a/empty", random_file(tmp_path / "empty", 0))

    assert store.get_bytes(small.key) == (tmp_path / "config.json").read_bytes()
    assert store.get_bytes(empty.key) == b"" and empty.size == 0


def test_put_file_refuses_bytes_that_do_not_match_the_expected_digest(store, tmp_path):
    for size in (100, 12 * MiB):  # the direct and the staged (multipart) paths
        source = random_file(tmp_path / f"f{size}", size)
        with pytest.raises(IntegrityError, match="sha256"):
            store.put_file(f"data/f{size}", source, sha256="0" * 64)
        assert not store.exists(f"data/f{size}")
    assert store.list() == []


def test_list_is_a_sorted_string_prefix_match(store):
    for key in ("b", "ab", "a/c", "a/b/d", "a/b/c"):
        store.put_bytes(key, key.encode())

    assert store.list() == ["a/b/c", "a/b/d", "a/c", "ab", "b"]
    assert store.list("a/") == ["a/b/c", "a/b/d", "a/c"]
    assert store.list("a") == ["a/b/c", "a/b/d", "a/c", "ab"]
    assert store.list("a/b/") == ["a/b/c", "a/b/d"]
    assert store.list("zz/") == []


def test_missing_keys_give_clear_errors(store, tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        store.get_bytes("runs/nope/x")
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        store.info("runs/nope/x")
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        store.download_file("runs/nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="no such file"):
        store.put_file("a", tmp_path / "missing")
    with pytest.raises(InputError, match="folder"):
        store.put_file("a", tmp_path)


# --- nothing is overwritten ----------------------------------------------------------------


def test_rewriting_a_key_is_refused_unless_identical(store, tmp_path):
    first = store.put_bytes("runs/r1/select/selection.json", b"v1")

    assert store.put_bytes("runs/r1/select/selection.json", b"v1") == first
    with pytest.raises(OutputExistsError, match="never overwritten"):
        store.put_bytes("runs/r1/select/selection.json", b"v2")
    assert store.get_bytes("runs/r1/select/selection.json") == b"v1"

    big = store.put_file("big.bin", random_file(tmp_path / "big1", 12 * MiB))
    assert store.put_file("big.bin", tmp_path / "big1") == big
    with pytest.raises(OutputExistsError):
        store.put_file("big.bin", random_file(tmp_path / "big2", 12 * MiB))
    assert store.info("big.bin").sha256 == big.sha256
    assert store.list() == ["big.bin", "runs/r1/select/selection.json"]


def test_download_detects_corruption(store, tmp_path):
    info = store.put_bytes("weights.bin", b"original bytes")
    with pytest.raises(IntegrityError, match="sha256"):
        store.download_file("weights.bin", tmp_path / "w.bin", sha256=sha256(b"something else"))
    assert not (tmp_path / "w.bin").exists()
    assert store.download_file("weights.bin", tmp_path / "w.bin", sha256=info.sha256).sha256 == info.sha256


def test_file_store_detects_bytes_changed_on_disk(tmp_path):
    store = open_store(str(tmp_path / "store"))  # a plain path works too
    info = store.put_bytes("w.bin", b"original bytes")
    Path(info.uri.removeprefix("file://")).write_bytes(b"tampered bytes")

    with pytest.raises(IntegrityError):
        store.download_file("w.bin", tmp_path / "w.bin", sha256=info.sha256)


@pytest.mark.integration
def test_s3_reads_detect_bytes_that_do_not_match_their_recorded_digest(s3_env, s3_store, tmp_path):
    info = s3_store.put_bytes("w.bin", b"original bytes")
    bucket, key = bucket_and_key(info.uri)
    # Someone bypasses the store and writes other bytes under the recorded digest.
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"tampered bytes", Metadata={"sha256": info.sha256})

    with pytest.raises(IntegrityError):
        s3_store.get_bytes("w.bin")
    with pytest.raises(IntegrityError):
        s3_store.download_file("w.bin", tmp_path / "w.bin")
    assert not (tmp_path / "w.bin").exists()


@pytest.mark.integration
def test_s3_versions_are_kept_and_recorded(s3_env, s3_store):
    raw = s3_env.client()
    runs = {}
    for run_id, content in (("run-1", b"selection one"), ("run-2", b"selection two")):
        manifest = start_manifest("layer_select", "1.0", run_id, {"top_percent": 25}, [])
        info = s3_store.put_bytes(output_key(run_id, "layer_select", "selection.json"), content)
        commit_manifest(s3_store, manifest.finish([info]))
        runs[run_id] = info

    bucket, key = bucket_and_key(runs["run-1"].uri)
    assert raw.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    recorded = load_manifest(s3_store, "run-1", "layer_select").outputs[0]
    assert recorded["version_id"] == runs["run-1"].version_id is not None

    # An outside writer replaces, then deletes, run 1's output: the recorded version survives.
    raw.put_object(Bucket=bucket, Key=key, Body=b"replaced outside the store")
    assert s3_store.info(runs["run-1"].key).version_id != recorded["version_id"]
    assert s3_store.info(runs["run-1"].key).sha256 == sha256(b"replaced outside the store")  # no metadata: hashed
    raw.delete_object(Bucket=bucket, Key=key)
    assert not s3_store.exists(runs["run-1"].key)
    assert s3_store.get_bytes(runs["run-1"].key, version_id=recorded["version_id"]) == b"selection one"
    assert s3_store.info(runs["run-1"].key, version_id=recorded["version_id"]).sha256 == recorded["sha256"]
    versions = raw.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert len(versions) == 2
    assert s3_store.get_bytes(runs["run-2"].key) == b"selection two"


def test_file_store_has_no_versions(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    store.put_bytes("a", b"x")
    with pytest.raises(InputError, match="no versions"):
        store.get_bytes("a", version_id="abc")


@pytest.mark.integration
def test_s3_multipart_copy_publishes_atomically_and_refuses_overwrite(s3_env, tmp_path):
    """Files above the copy part size are published with a multipart copy (S3's CopyObject stops at 5 GiB)."""
    store = S3Store(parse_store_uri(f"s3://{fresh_bucket()}/p"), part_size=5 * MiB, copy_part_size=5 * MiB)
    source = random_file(tmp_path / "data.parquet", 12 * MiB + 7)

    info = store.put_file("drops/d1/data.parquet", source)
    assert store.put_file("drops/d1/data.parquet", source) == info
    with pytest.raises(OutputExistsError):
        store.put_file("drops/d1/data.parquet", random_file(tmp_path / "other", 12 * MiB))

    assert store.download_file(info.key, tmp_path / "back").sha256 == sha256(source.read_bytes())
    bucket, _ = bucket_and_key(info.uri)
    raw = s3_env.client()
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.list() == ["drops/d1/data.parquet"]  # staging objects are gone and never listed


# --- a writer killed mid-upload ------------------------------------------------------------

WRITER = """
import sys
from stages.store import commit_manifest, open_store, start_manifest
store = open_store(sys.argv[1])
manifest = start_manifest("download", "1.0", "run-1", {}, [])
info = store.put_file("runs/run-1/download/model.safetensors", sys.argv[2])
commit_manifest(store, manifest.finish([info]))
"""


def open_fifo_for_writing(fifo: Path, reader: subprocess.Popen) -> int:
    """Open the FIFO once the child has opened it for reading (bounded wait)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        else:
            os.set_blocking(fd, True)
            return fd
        if reader.poll() is not None:
            pytest.fail(f"the writer exited early:\n{reader.stderr.read().decode()}")
        if time.monotonic() > deadline:
            pytest.fail("the writer never opened its input")
        time.sleep(0.05)


def test_writer_killed_mid_upload_leaves_nothing_committed(store, tmp_path):
    """The child streams a 20 MiB "file" from a FIFO; it is SIGKILLed once it has read 12 MiB.

    Whatever it had sent (a temporary file, a staging object, multipart parts) must not be
    visible as an output, and no manifest may exist. Then a new writer publishes normally.
    """
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, store.root_uri, str(fifo)], cwd=REPO_ROOT, stderr=subprocess.PIPE
    )
    try:
        with os.fdopen(open_fifo_for_writing(fifo, writer), "wb") as pipe:
            for _ in range(12):  # writes block until the child has read them: it is mid-upload
                pipe.write(os.urandom(MiB))
            pipe.flush()
            writer.send_signal(signal.SIGKILL)
            writer.wait()
    except BrokenPipeError:
        pytest.fail(f"the writer stopped reading early:\n{writer.stderr.read().decode()}")
    finally:
        writer.kill()
        writer.wait()

    key = "runs/run-1/download/model.safetensors"
    assert writer.returncode == -signal.SIGKILL
    assert not store.exists(key)
    assert store.list() == []
    assert list_runs(store) == {}

    source = random_file(tmp_path / "model.safetensors", 20 * MiB)
    assert store.put_file(key, source).sha256 == sha256(source.read_bytes())


# --- key and URI validation ----------------------------------------------------------------

BAD_KEYS = [
    "",
    "../outside",
    "a/../../outside",
    "a/./b",
    "/etc/passwd",
    "C:/windows",
    "a\\..\\b",
    "a//b",
    "a/b/",
    "a\x00b",
    "line\nbreak",
    ".spectrum-staging/x",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_bad_keys_are_refused(store, key, tmp_path):
    with pytest.raises(InputError, match="invalid store key"):
        store.put_bytes(key, b"x")
    with pytest.raises(InputError, match="invalid store key"):
        store.get_bytes(key)
    with pytest.raises(InputError, match="invalid store key"):
        store.exists(key)
    assert store.list() == []


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "a\\b/"])
def test_bad_prefixes_are_refused(store, prefix):
    with pytest.raises(InputError, match="invalid store prefix"):
        store.list(prefix)


def test_file_store_refuses_keys_that_escape_through_symlinks(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InputError, match="symbolic link"):
        store.put_bytes("link/x", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://ab/prefix", "bucket name"),
        ("s3://Bad_Bucket/x", "bucket name"),
        ("s3://bucket/../x", "invalid store prefix"),
        ("file://relative/path", "three slashes"),
        ("ftp://host/x", "unsupported scheme"),
        ("", "empty"),
    ],
)
def test_bad_store_uris_are_refused(uri, message):
    with pytest.raises(InputError, match=message):
        open_store(uri)


def test_bad_endpoint_url_is_refused():
    with pytest.raises(InputError, match="endpoint URL"):
        open_store("s3://bucket", endpoint_url="127.0.0.1:8333")
    with pytest.raises(InputError, match=r"http://\*\*\*@127.0.0.1:9 holds credentials: .*AWS_SECRET_ACCESS_KEY") as caught:
        open_store("s3://bucket", endpoint_url="http://admin:Sup3rS3cretPw@127.0.0.1:9")
    assert "Sup3rS3cretPw" not in str(caught.value) and "admin" not in str(caught.value)


def test_a_key_that_holds_objects_or_a_folder_to_download_into_is_a_clear_error(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("a/b", b"x")
    with pytest.raises(InputError, match="cannot store 'a': objects are stored under it"):
        store.put_bytes("a", b"y")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="cannot download to .*folder: it is a folder"):
        store.download_file("a/b", tmp_path / "folder")
    assert store.list() == ["a/b"] and list((tmp_path / "folder").iterdir()) == []


# --- credentials and an unreachable or stopped server ---------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("which", ["secret", "access key"])
def test_wrong_credentials_give_a_clear_error_without_secrets(s3_env, monkeypatch, which):
    wrong = "WrongSecretWrongSecretWrongSecret/+12345"
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")

    with pytest.raises(CredentialsRejectedError) as error:
        open_store(f"s3://{fresh_bucket()}")

    message = str(error.value)
    assert "credentials were rejected by" in message and s3_env.endpoint_url in message
    assert wrong not in message and s3_env.secret_key not in message


def test_missing_credentials_give_a_clear_error(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsRejectedError, match="no S3 credentials"):
        open_store("s3://bucket", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}")


def test_unreachable_endpoint_fails_after_bounded_retries(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "spectrum")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-value")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    with pytest.raises(StoreUnavailableError, match="cannot reach the S3 endpoint") as error:
        open_store("s3://bucket", endpoint_url=endpoint)
    assert endpoint in str(error.value) and "not-a-real-secret-value" not in str(error.value)


@pytest.mark.integration
def test_server_stopped_mid_run_fails_clearly_and_loses_nothing_committed(private_s3_server, monkeypatch, tmp_path):
    import pyarrow as pa

    use_s3_server(monkeypatch, private_s3_server, tmp_path)
    store = open_store("s3://spectrum-runs/prod")

    done = start_manifest("snr_scan", "1.0", "run-1", {"estimator": "reference"}, [])
    table = write_table(store, "snr", pa.table({"tensor_name": ["a", "b"], "snr": [1.5, 0.5]}), stage="snr_scan", run_id="run-1")
    committed = commit_manifest(store, done.finish([table]))

    running = start_manifest("snr_scan", "1.0", "run-2", {"estimator": "reference"}, [])
    partial = write_table(store, "snr", pa.table({"tensor_name": ["c"], "snr": [2.0]}), stage="snr_scan", run_id="run-2")
    private_s3_server.stop()

    with pytest.raises(StoreUnavailableError) as error:
        store.put_bytes(output_key("run-2", "snr_scan", "summary.json"), b"{}")
    assert private_s3_server.endpoint_url in str(error.value)
    with pytest.raises(StoreUnavailableError):
        commit_manifest(store, running.finish([partial]))
    with pytest.raises(StoreUnavailableError):
        open_store("s3://spectrum-runs/prod")

    private_s3_server.start()  # same folder, same ports
    assert store.get_bytes(committed.key) == load_manifest(store, "run-1", "snr_scan").to_json()
    assert list_runs(store) == {"run-1": ["snr_scan"]}
    assert read_table(store, "snr").column("run_id").to_pylist() == ["run-1", "run-1"]
    assert store.info(table.key).sha256 == table.sha256


def test_read_only_file_store_requires_the_folder_and_creates_nothing(tmp_path):
    from stages.store import ArtifactNotFoundError

    with pytest.raises(ArtifactNotFoundError, match="no artifact store at"):
        open_store(str(tmp_path / "missing"), writable=False)
    assert not (tmp_path / "missing").exists()
    open_store(str(tmp_path / "made")).put_bytes("a/b.txt", b"x")
    assert open_store(str(tmp_path / "made"), writable=False).get_bytes("a/b.txt") == b"x"


@pytest.mark.integration
def test_read_only_s3_store_leaves_a_foreign_bucket_untouched(s3_env):
    from stages.store import ArtifactNotFoundError

    client = s3_env.client()
    missing = fresh_bucket()
    with pytest.raises(ArtifactNotFoundError, match=f"s3://{missing} does not exist"):
        open_store(f"s3://{missing}/models", writable=False)
    assert missing not in {b["Name"] for b in client.list_buckets()["Buckets"]}

    foreign = fresh_bucket()  # someone else's bucket, without versioning
    client.create_bucket(Bucket=foreign)
    client.put_object(Bucket=foreign, Key="models/config.json", Body=b"{}")
    reader = open_store(f"s3://{foreign}/models", writable=False)
    assert reader.get_bytes("config.json") == b"{}"
    assert client.get_bucket_versioning(Bucket=foreign).get("Status") is None
