"""The download stage: models from the hub (a local fake of its HTTP API), folders and the store; data drops; refusals."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import socket
import string
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base.errors import CorruptWeightsError, InputError
from stages.core.cli import stage_main
from stages.core.stage import StageContext
from stages.download import STAGE, DownloadConfig, read_summary, run
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as snr_scan_run
from stages.store import open_store
from stages.store.trees import materialize
from stages.weights.checkpoint import INDEX_FILE
from stages.weights.hub import HubUnavailableError

from .helpers import REPO_ROOT, hub_cache_snapshot

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch) -> None:
    """Private Hugging Face and Spectrum caches, no token, online, and retries without waiting."""
    monkeypatch.setenv("SPECTRUM_CACHE", str(tmp_path / "spectrum-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("SPECTRUM_DOWNLOAD_RETRY_BASE_SECONDS", "0")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    """A private, writable copy of the tiny checkpoint with tokenizer files and a stray file."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (folder / "generation_config.json").write_text('{"max_new_tokens": 8}')
    (folder / "README.md").write_text("notes\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    return folder


def local_store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a fake of the hub's HTTP API, enough for huggingface_hub.snapshot_download --------------


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    branches: dict[str, str] = field(default_factory=lambda: {"main": COMMIT})


class FakeHub:
    """GET /api/models/{repo}/revision/{rev}, GET /api/models/{repo}/tree/{rev}, HEAD/GET /{repo}/resolve/{rev}/{path}.

    Unknown repos and revisions answer 404 with the hub's X-Error-Code header. `fail_revision`
    makes that many revision look-ups answer 503 first.
    """

    def __init__(self, repos: dict[str, FakeRepo]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.fail_revision = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self, with_body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, with_body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fetched(self, method: str = "GET") -> list[str]:
        """Repo files requested with `method` through the resolve endpoint."""
        return [path.split("/", 5)[5] for m, path in self.requests if m == method and "/resolve/" in path]

    def _handle(self, request: BaseHTTPRequestHandler, with_body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        if request.headers.get("Authorization"):
            self.authorizations.add(request.headers["Authorization"])
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] in ("revision", "tree"):
            repo_id, endpoint, revision, file_path = "/".join(parts[2:4]), parts[4], parts[5], None
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, endpoint, revision, file_path = "/".join(parts[:2]), "resolve", parts[3], "/".join(parts[4:])
        else:
            return self._send(request, 404, b"not found", {}, with_body)
        if endpoint == "revision" and self.fail_revision > 0:
            self.fail_revision -= 1
            return self._send(request, 503, b"busy", {}, with_body)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(request, "RepoNotFound", "Repository not found", with_body)
        commit = repo.branches.get(revision, revision if revision in repo.branches.values() else None)
        if commit is None:
            return self._error(request, "RevisionNotFound", f"Invalid rev id: {revision}", with_body)
        if endpoint == "revision":
            body = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": name} for name in repo.files]}
            return self._json(request, body, with_body)
        if endpoint == "tree":
            body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for n, d in repo.files.items()]
            return self._json(request, body, with_body)
        if file_path not in repo.files:
            return self._error(request, "EntryNotFound", "Entry not found", with_body)
        data = repo.files[file_path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        return self._send(request, 200, data, headers, with_body)

    def _json(self, request, body, with_body: bool) -> None:
        self._send(request, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, with_body)

    def _error(self, request, code: str, message: str, with_body: bool) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(request, 404, json.dumps({"error": message}).encode(), headers, with_body)

    @staticmethod
    def _send(request, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if with_body:
            request.wfile.write(body)


@pytest.fixture
def hub_repo_files(tiny_model) -> dict[str, bytes]:
    return {
        "config.json": (tiny_model / "config.json").read_bytes(),
        "model.safetensors": (tiny_model / "model.safetensors").read_bytes(),
        "tokenizer_config.json": b'{"model_max_length": 128}',
        "README.md": b"# tiny\n",
        "pytorch_model.bin": b"pickle bytes that must never be fetched",
    }


@pytest.fixture
def hub(hub_repo_files, monkeypatch) -> Iterator[FakeHub]:
    server = FakeHub({"org/tiny": FakeRepo(hub_repo_files)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def forbid_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- hub models -----------------------------------------------------------------------------


def test_hub_model_at_a_branch_records_the_resolved_commit(hub, hub_repo_files, tmp_path, monkeypatch):
    token = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
    monkeypatch.setenv("HF_TOKEN", token)
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model="org/tiny", revision="main"), StageContext(store, progress=False))

    manifest = outcome.manifest
    assert manifest.parameters["model_commit"] == COMMIT and manifest.parameters["revision"] == "main"
    summary = read_summary(store, manifest)["model"]
    assert summary["commit"] == COMMIT and summary["skipped"] == ["README.md", "pytorch_model.bin"]
    assert sorted(hub.fetched()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert {ref["uri"] for ref in manifest.inputs} == {
        f"{hub.url}/org/tiny/resolve/{COMMIT}/{name}" for name in ("config.json", "model.safetensors", "tokenizer_config.json")
    }
    local = materialize(summary["uri"], store)
    assert folder_bytes(local) == {n: hub_repo_files[n] for n in ("config.json", "model.safetensors", "tokenizer_config.json")}
    # The token was sent to the hub but is in no stored record.
    assert f"Bearer {token}" in hub.authorizations
    for key in store.list():
        assert token.encode() not in store.get_bytes(key), key


def test_hub_model_at_a_pinned_commit(hub, tmp_path):
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model="org/tiny", revision=COMMIT), StageContext(store, progress=False))
    assert read_summary(store, outcome.manifest)["model"]["commit"] == COMMIT
    assert not [path for _, path in hub.requests if "/revision/" in path]  # a commit needs no look-up


def test_hub_repo_not_found(hub, tmp_path):
    with pytest.raises(InputError, match=r"hub model org/missing was not found at http://127\.0\.0\.1:\d+"):
        run(DownloadConfig(model="org/missing"), StageContext(local_store(tmp_path)))


def test_hub_revision_not_found(hub, tmp_path):
    with pytest.raises(InputError, match="revision 'v9' of hub model org/tiny does not exist"):
        run(DownloadConfig(model="org/tiny", revision="v9"), StageContext(local_store(tmp_path)))
    with pytest.raises(InputError, match=f"revision '{OTHER_COMMIT}' of hub model org/tiny does not exist"):
        run(DownloadConfig(model="org/tiny", revision=OTHER_COMMIT), StageContext(local_store(tmp_path)))


def test_hub_unreachable_is_retried_then_a_clear_error(tmp_path, monkeypatch, caplog):
    endpoint = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    store = local_store(tmp_path)
    unreachable = f"could not reach the Hugging Face hub at {endpoint} .* after 3 attempts"
    with caplog.at_level(logging.WARNING, logger="stages.weights.hub"), pytest.raises(HubUnavailableError, match=unreachable):
        run(DownloadConfig(model="org/tiny"), StageContext(store))
    retries = [r for r in caplog.records if r.name == "stages.weights.hub" and "retrying" in r.getMessage()]
    assert [r.getMessage().split(" for ")[0] for r in retries] == ["attempt 1 of 3", "attempt 2 of 3"]
    assert store.list() == []


def test_hub_server_errors_are_retried_until_it_answers(hub, tmp_path):
    hub.fail_revision = 2
    outcome = run(DownloadConfig(model="org/tiny"), StageContext(local_store(tmp_path), progress=False))
    assert outcome.manifest.parameters["model_commit"] == COMMIT
    assert len([path for _, path in hub.requests if "/revision/main" in path]) == 3


def test_hub_pickle_only_repo_is_refused_before_any_weights_are_fetched(hub, hub_repo_files, tmp_path):
    del hub_repo_files["model.safetensors"]
    with pytest.raises(InputError, match=r"only pickle weights \(pytorch_model\.bin\).*--allow-pickle"):
        run(DownloadConfig(model="org/tiny"), StageContext(local_store(tmp_path)))
    assert "pytorch_model.bin" not in hub.fetched() + hub.fetched("HEAD")


def test_hub_pickle_weights_with_allow_pickle(hub, hub_repo_files, tmp_path):
    del hub_repo_files["model.safetensors"]
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model="org/tiny", allow_pickle=True), StageContext(store, progress=False))
    local = materialize(read_summary(store, outcome.manifest)["model"]["uri"], store)
    assert (local / "pytorch_model.bin").read_bytes() == hub_repo_files["pytorch_model.bin"]


def test_hub_custom_code_is_refused_without_trust_remote_code(hub, hub_repo_files, tmp_path):
    config = json.loads(hub_repo_files["config.json"])
    hub_repo_files["config.json"] = json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}).encode()
    hub_repo_files["modeling_x.py"] = b"print('custom code')\n"
    with pytest.raises(InputError, match=r"needs custom code.*auto_map.*config\.json.*--trust-remote-code"):
        run(DownloadConfig(model="org/tiny"), StageContext(local_store(tmp_path)))
    assert "model.safetensors" not in hub.fetched()
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model="org/tiny", trust_remote_code=True), StageContext(store, progress=False))
    assert "modeling_x.py" in folder_bytes(materialize(read_summary(store, outcome.manifest)["model"]["uri"], store))


def test_offline_mode_uses_the_hub_cache_and_no_network(hub, tmp_path, monkeypatch):
    store = local_store(tmp_path)
    online = run(DownloadConfig(model="org/tiny"), StageContext(store, progress=False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_network(monkeypatch)
    offline = run(DownloadConfig(model="org/tiny"), StageContext(store, force=True, progress=False))
    assert offline.manifest.parameters["model_commit"] == COMMIT
    assert read_summary(store, offline.manifest)["model"]["tree"] == read_summary(store, online.manifest)["model"]["tree"]


def test_offline_mode_without_a_cached_copy(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_network(monkeypatch)
    with pytest.raises(InputError, match="offline mode .* org/tiny@main is not .* in the local cache"):
        run(DownloadConfig(model="org/tiny"), StageContext(local_store(tmp_path)))


# --- sharded hub models: the hub cache stores every file as a link into the repository's blobs/ ---


@pytest.fixture
def sharded_hub(synthetic_model, monkeypatch) -> Iterator[tuple[FakeHub, dict[str, bytes]]]:
    """The fake hub serving `org/sharded`: a four-shard checkpoint with its index."""
    folder = synthetic_model(max_shard_bytes=100_000)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert INDEX_FILE in files and len([name for name in files if name.endswith(".safetensors")]) >= 3
    server = FakeHub({"org/sharded": FakeRepo({**files, "README.md": b"# sharded\n"})})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server, files
    server.close()


def scan_rows(model: str, store=None, output: Path | None = None) -> dict[str, tuple]:
    """tensor name -> (tensor sha256, snr) of a scan of `model` (into `store`, or to the local `output`)."""
    config = ScanConfig(model_dir=model, output=str(output) if output else None, model_id="m", workers=1)
    result = snr_scan_run(config, StageContext(store, progress=False))
    assert result.manifest is None or result.manifest.status == "succeeded"
    return {row["tensor_name"]: (row.get("tensor_sha256"), row.get("snr")) for row in result.detail.rows}


def test_hub_sharded_model_is_downloaded_and_scanned(sharded_hub, synthetic_model, tmp_path):
    hub, files = sharded_hub
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model="org/sharded"), StageContext(store, progress=False))

    snapshot = tmp_path / "hf-home" / "hub" / "models--org--sharded" / "snapshots" / COMMIT
    assert all((snapshot / name).is_symlink() for name in files)  # the hub cache layout this is about
    summary = read_summary(store, outcome.manifest)["model"]
    assert summary["commit"] == COMMIT and summary["files"] == len(files) and summary["skipped"] == ["README.md"]
    assert folder_bytes(materialize(summary["uri"], store)) == files
    assert {ref["uri"] for ref in outcome.manifest.inputs} == {f"{hub.url}/org/sharded/resolve/{COMMIT}/{name}" for name in files}

    # The stored model, the hub snapshot itself and the original folder scan alike.
    original = scan_rows(str(synthetic_model(max_shard_bytes=100_000)), output=tmp_path / "original.parquet")
    assert scan_rows(summary["uri"], store) == original
    assert scan_rows(str(snapshot), output=tmp_path / "snapshot.parquet") == original


def test_a_hub_cache_snapshot_folder_is_a_local_model_source(synthetic_model, tmp_path):
    folder = synthetic_model(max_shard_bytes=100_000)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    snapshot = hub_cache_snapshot(tmp_path / "cache", "org/sharded", COMMIT, files)
    store = local_store(tmp_path)
    summary = read_summary(store, run(DownloadConfig(model=str(snapshot)), StageContext(store, progress=False)).manifest)["model"]
    assert folder_bytes(materialize(summary["uri"], store)) == files


# --- symbolic links out of a source folder are refused ----------------------------------------


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    path.symlink_to(target)


def _outside_file(tmp_path: Path, data: bytes = b'{"secret": "from elsewhere on the machine"}') -> Path:
    target = tmp_path / "elsewhere" / "private.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _outside_folder(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere" / "shared"
    target.mkdir(parents=True, exist_ok=True)
    (target / "more.jsonl").write_text('{"text": "not part of the drop"}\n')
    (target / "model-00009.safetensors").write_bytes(b"not part of the model")
    return target


def _model_with_a_linked_file(tmp_path, model_dir) -> tuple[Path, str, Path]:
    target = _outside_file(tmp_path)
    _link(model_dir / "tokenizer_config.json", target)
    return model_dir, "tokenizer_config.json", target


def _model_with_a_linked_shard(tmp_path, model_dir) -> tuple[Path, str, Path]:
    target = tmp_path / "elsewhere" / "weights.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(model_dir / "model.safetensors", target)
    _link(model_dir / "model.safetensors", target)
    return model_dir, "model.safetensors", target


def _model_with_a_linked_folder(tmp_path, model_dir) -> tuple[Path, str, Path]:
    target = _outside_folder(tmp_path)
    _link(model_dir / "extra", target)
    return model_dir, "extra", target


def _model_with_a_relative_link_out(tmp_path, model_dir) -> tuple[Path, str, Path]:
    target = _outside_file(tmp_path)
    _link(model_dir / "sub" / "vocab.json", Path("../..") / "elsewhere" / "private.json")
    return model_dir, "sub/vocab.json", target


def _drop_with_a_linked_file(tmp_path, model_dir) -> tuple[Path, str, Path]:
    drop = write_drop(tmp_path / "drop")
    target = _outside_file(tmp_path, b'[{"text": "private"}]')
    _link(drop / "part1" / "private.json", target)
    return drop, "part1/private.json", target


def _drop_with_a_linked_folder(tmp_path, model_dir) -> tuple[Path, str, Path]:
    drop = write_drop(tmp_path / "drop")
    target = _outside_folder(tmp_path)
    _link(drop / "part2", target)
    return drop, "part2", target


def _drop_with_a_chain_of_links(tmp_path, model_dir) -> tuple[Path, str, Path]:
    """A link to a link inside the drop that itself leads out: where it finally leads counts."""
    drop = write_drop(tmp_path / "drop")
    target = _outside_file(tmp_path, b'[{"text": "private"}]')
    _link(drop / "hop.json", target)
    _link(drop / "part1" / "alias.json", Path("..") / "hop.json")
    return drop, "hop.json", target


@pytest.mark.parametrize(
    "make",
    [
        _model_with_a_linked_file,
        _model_with_a_linked_shard,
        _model_with_a_linked_folder,
        _model_with_a_relative_link_out,
        _drop_with_a_linked_file,
        _drop_with_a_linked_folder,
        _drop_with_a_chain_of_links,
    ],
    ids=lambda make: make.__name__.strip("_"),
)
def test_links_out_of_a_source_folder_are_refused(make, model_dir, tmp_path):
    folder, name, target = make(tmp_path, model_dir)
    kind = "model" if folder == model_dir else "data"
    store = local_store(tmp_path)
    config = DownloadConfig(model=str(folder)) if kind == "model" else DownloadConfig(data=str(folder))
    with pytest.raises(InputError) as raised:
        run(config, StageContext(store, progress=False))
    message = str(raised.value)
    assert f"{name} in {'model' if kind == 'model' else 'data drop'} {folder} points to {target.resolve()}, outside {folder}" in message
    assert "copy the file into the folder" in message
    assert store.list() == []


def test_links_inside_a_source_folder_are_fine(model_dir, tmp_path):
    (model_dir / "sub").mkdir()
    shutil.move(model_dir / "tokenizer_config.json", model_dir / "sub" / "tok.json")
    (model_dir / "tokenizer_config.json").symlink_to(Path("sub") / "tok.json")
    drop = write_drop(tmp_path / "drop")
    (drop / "latest.jsonl").symlink_to(Path("part1") / "chat.jsonl")
    (drop / "again").symlink_to("part1", target_is_directory=True)  # a linked folder inside the drop: not walked twice
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model=str(model_dir), data=str(drop)), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)
    model = folder_bytes(materialize(summary["model"]["uri"], store))
    assert model["tokenizer_config.json"] == b'{"model_max_length": 128}'
    data = folder_bytes(materialize(summary["data"]["uri"], store))
    assert data["latest.jsonl"] == (drop / "part1" / "chat.jsonl").read_bytes()
    assert summary["data"]["records"] == 11 + 2


def test_a_hub_snapshot_linking_out_of_its_repository_is_refused(synthetic_model, tmp_path):
    folder = synthetic_model(max_shard_bytes=100_000)
    snapshot = hub_cache_snapshot(tmp_path / "cache", "org/sharded", COMMIT, {p.name: p.read_bytes() for p in folder.iterdir()})
    target = _outside_file(tmp_path)
    (snapshot / "tokenizer_config.json").symlink_to(target)
    store = local_store(tmp_path)
    with pytest.raises(InputError, match=rf"tokenizer_config\.json in model .* points to {target}, outside .*models--org--sharded;"):
        run(DownloadConfig(model=str(snapshot)), StageContext(store))
    assert store.list() == []


# --- local and stored models ----------------------------------------------------------------


def test_local_model_round_trip(store, model_dir):
    outcome = run(DownloadConfig(model=str(model_dir)), StageContext(store, progress=False))
    assert not outcome.cached and outcome.manifest.status == "succeeded"
    summary = read_summary(store, outcome.manifest)["model"]
    assert summary["skipped"] == ["README.md"]
    local = materialize(summary["uri"], store)
    expected = {n: d for n, d in folder_bytes(model_dir).items() if n not in ("README.md", ".cache/junk")}
    assert folder_bytes(local) == expected

    manifest = outcome.manifest
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}
    assert {(ref["uri"], ref["sha256"]) for ref in manifest.inputs} == {
        ((model_dir / name).as_uri(), digest) for name, digest in digests.items()
    }
    outputs = {o["key"]: o["sha256"] for o in manifest.outputs}
    tree = summary["tree"]
    assert {k: v for k, v in outputs.items() if k.startswith(f"models/{tree}/")} == {
        f"models/{tree}/{name}": digest for name, digest in digests.items()
    }
    assert f"models/{tree}.listing.json" in outputs


def test_redownload_is_cached_and_stores_nothing_twice(store, model_dir):
    first = run(DownloadConfig(model=str(model_dir)), StageContext(store, progress=False))
    keys = store.list()
    again = run(DownloadConfig(model=str(model_dir)), StageContext(store, progress=False))
    assert again.cached and again.manifest.run_id == first.manifest.run_id
    assert store.list() == keys
    forced = run(DownloadConfig(model=str(model_dir)), StageContext(store, force=True, progress=False))
    new_keys = sorted(set(store.list()) - set(keys))
    assert all(key.startswith((f"runs/{forced.manifest.run_id}/", "cache/download/")) for key in new_keys), new_keys


def test_a_stored_model_as_source(model_dir, tmp_path):
    store = local_store(tmp_path)
    first = read_summary(store, run(DownloadConfig(model=str(model_dir)), StageContext(store, progress=False)).manifest)["model"]
    keys = [key for key in store.list() if key.startswith("models/")]
    for source in (first["uri"], f"store:models/{first['tree']}"):
        outcome = run(DownloadConfig(model=source), StageContext(store, progress=False))
        assert read_summary(store, outcome.manifest)["model"]["tree"] == first["tree"]
        assert all(ref["uri"].startswith(first["uri"]) for ref in outcome.manifest.inputs)
    assert [key for key in store.list() if key.startswith("models/")] == keys


def test_a_store_prefix_that_is_not_a_download(model_dir, tmp_path):
    store = local_store(tmp_path)
    for name, data in folder_bytes(model_dir).items():
        store.put_bytes(f"uploads/llm/{name}", data)
    outcome = run(DownloadConfig(model="store:uploads/llm"), StageContext(store, progress=False))
    assert read_summary(store, outcome.manifest)["model"]["files"] == 4  # README.md skipped, .cache ignored


def test_pickle_only_folder_is_refused_naming_the_files(model_dir, tmp_path):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    (model_dir / "extra.pt").write_bytes(b"x")
    store = local_store(tmp_path)
    with pytest.raises(InputError, match=r"only pickle weights \(extra\.pt, pytorch_model\.bin\)"):
        run(DownloadConfig(model=str(model_dir)), StageContext(store))
    outcome = run(DownloadConfig(model=str(model_dir), allow_pickle=True), StageContext(store, progress=False))
    local = materialize(read_summary(store, outcome.manifest)["model"]["uri"], store)
    assert {"pytorch_model.bin", "extra.pt"} <= set(folder_bytes(local))


def test_pickle_files_beside_safetensors_are_not_copied(model_dir, tmp_path):
    (model_dir / "training_args.bin").write_bytes(b"pickle")
    store = local_store(tmp_path)
    summary = read_summary(store, run(DownloadConfig(model=str(model_dir)), StageContext(store, progress=False)).manifest)["model"]
    assert "training_args.bin" in summary["skipped"]
    assert not [key for key in store.list() if key.endswith(".bin")]


def test_custom_code_folder_needs_trust_remote_code(model_dir, tmp_path):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    (model_dir / "tok.py").write_text("class Tok: pass\n")
    store = local_store(tmp_path)
    with pytest.raises(InputError, match=r"auto_map` in tokenizer_config\.json"):
        run(DownloadConfig(model=str(model_dir)), StageContext(store))
    outcome = run(DownloadConfig(model=str(model_dir), trust_remote_code=True), StageContext(store, progress=False))
    assert outcome.manifest.parameters["trust_remote_code"] is True
    assert "tok.py" in folder_bytes(materialize(read_summary(store, outcome.manifest)["model"]["uri"], store))


def test_model_folder_refusals(model_dir, tmp_path):
    store = local_store(tmp_path)
    with pytest.raises(InputError, match="model folder .*missing does not exist"):
        run(DownloadConfig(model=str(tmp_path / "missing")), StageContext(store))
    with pytest.raises(InputError, match="--revision 'main' applies only to a Hugging Face hub model"):
        run(DownloadConfig(model=str(model_dir), revision="main"), StageContext(store))
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
        run(DownloadConfig(model=str(model_dir)), StageContext(store))
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no weights"):
        run(DownloadConfig(model=str(model_dir)), StageContext(store))
    (model_dir / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json"):
        run(DownloadConfig(model=str(model_dir)), StageContext(store))
    with pytest.raises(InputError, match="nothing to download"):
        run(DownloadConfig(), StageContext(store))
    assert not [key for key in store.list() if not key.startswith("runs/")]


def test_offline_mode_works_from_a_local_folder(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    forbid_network(monkeypatch)
    outcome = run(DownloadConfig(model=str(model_dir)), StageContext(local_store(tmp_path), progress=False))
    assert outcome.manifest.status == "succeeded"


# --- data drops -----------------------------------------------------------------------------


def write_drop(folder: Path) -> Path:
    (folder / "part1").mkdir(parents=True)
    (folder / "notes.txt").write_text("first line\nsecond line — ü\n\n", encoding="utf-8")
    (folder / "part1" / "chat.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (folder / "meta.json").write_text('[{"text": "c"}, {"text": "d"}, {"text": "e"}]')
    pq.write_table(pa.table({"text": ["f", "g", "h", "i"]}), folder / "part1" / "rows.parquet")
    return folder


def test_data_drop_of_every_file_kind(store, tmp_path):
    drop = write_drop(tmp_path / "drop")
    outcome = run(DownloadConfig(data=str(drop)), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)["data"]
    assert summary["format"] == "files" and summary["records"] == 2 + 2 + 3 + 4 and summary["files"] == 4
    assert folder_bytes(materialize(summary["uri"], store)) == folder_bytes(drop)
    assert len([ref for ref in outcome.manifest.inputs if ref["role"] == "data"]) == 4


def test_model_and_data_in_one_run(model_dir, tmp_path):
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model=str(model_dir), data=str(write_drop(tmp_path / "drop"))), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)
    assert set(summary) == {"model", "data"}
    assert summary["model"]["uri"].endswith(f"/models/{summary['model']['tree']}")
    assert summary["data"]["uri"].endswith(f"/data/{summary['data']['tree']}")


def test_datasets_save_to_disk_folder(store, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"]}), "test": datasets.Dataset.from_dict({"text": ["d"]})}
    ).save_to_disk(str(folder))
    outcome = run(DownloadConfig(data=str(folder)), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)["data"]
    assert summary["format"] == "datasets" and summary["records"] == 4
    loaded = datasets.load_from_disk(str(materialize(summary["uri"], store)))
    assert loaded["train"]["text"] == ["a", "b", "c"] and loaded["test"].num_rows == 1


def test_a_drop_from_a_store_prefix(store, tmp_path):
    drop = write_drop(tmp_path / "drop")
    for name, data in folder_bytes(drop).items():
        store.put_bytes(f"drops/2026-01/{name}", data)
    for source in ("store:drops/2026-01", store.uri("drops/2026-01")):
        outcome = run(DownloadConfig(data=source), StageContext(store, progress=False))
        summary = read_summary(store, outcome.manifest)["data"]
        assert summary["records"] == 11
        assert folder_bytes(materialize(summary["uri"], store)) == folder_bytes(drop)
    with pytest.raises(InputError, match="is empty: nothing is stored under it"):
        run(DownloadConfig(data="store:drops/2027-01"), StageContext(store))


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "is empty: it has no .txt"),
        ({"a.txt": b"", "b.jsonl": b"\n\n"}, r"is empty: its 2 file\(s\) hold no records"),
        ({"a.txt": b"x", "report.pdf": b"%PDF", "sub/x.csv": b"a,b"}, r"unsupported types: report\.pdf, sub/x\.csv"),
        ({"ok.jsonl": b'{"a": 1}\n', "bad.jsonl": b'{"a": 1}\n\n{"a": \n'}, r"bad\.jsonl in data drop .*, line 3 is not JSON"),
        ({"t.parquet": b"PAR1 this is not parquet"}, r"t\.parquet in data drop .* is not a readable Parquet file"),
        ({"t.txt": b"fine\nlatin-1 \xe9t\xe9\n"}, r"t\.txt in data drop .*, line 2 is not UTF-8 text"),
        ({"t.json": b"[1, 2,\n 3,]"}, r"t\.json in data drop .* is not valid JSON: .* line 2"),
        ({"t.json": b'["\xff"]'}, r"t\.json in data drop .* is not UTF-8 text"),
    ],
    ids=["empty", "no-records", "unsupported", "bad-jsonl", "bad-parquet", "not-utf8", "bad-json", "json-not-utf8"],
)
def test_bad_drops_are_refused(tmp_path, files, message):
    drop = tmp_path / "drop"
    drop.mkdir()
    for name, data in files.items():
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(data)
    store = local_store(tmp_path)
    with pytest.raises(InputError, match=message):
        run(DownloadConfig(data=str(drop)), StageContext(store))
    assert store.list() == []


def test_a_broken_saved_dataset_is_refused(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "dataset_info.json").write_text("{}")
    with pytest.raises(InputError, match="looks like a datasets save_to_disk folder but cannot be loaded"):
        run(DownloadConfig(data=str(folder)), StageContext(local_store(tmp_path)))


def test_a_missing_drop_folder(tmp_path):
    with pytest.raises(InputError, match="data drop folder .*nowhere does not exist"):
        run(DownloadConfig(data=str(tmp_path / "nowhere")), StageContext(local_store(tmp_path)))


# --- command line ---------------------------------------------------------------------------


def test_cli_reports_one_line(model_dir, tmp_path, capsys):
    store_uri = (tmp_path / "store").as_uri()
    assert stage_main(STAGE, ["--store", store_uri, "--model", str(model_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("download: committed run") and "/models/sha256-" in out[0]
    assert stage_main(STAGE, ["--store", store_uri, "--model", str(model_dir), "--no-progress"]) == 0
    assert "reusing run" in capsys.readouterr().out


def test_cli_errors_exit_non_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPECTRUM_STORE", raising=False)
    assert stage_main(STAGE, ["--model", str(tmp_path)]) == 2
    assert "no artifact store" in capsys.readouterr().err
    assert stage_main(STAGE, ["--store", str(tmp_path / "store"), "--data", str(tmp_path / "none")]) == 2
    assert "error: data drop folder" in capsys.readouterr().err


@pytest.mark.integration
def test_module_entrypoint_against_the_fake_hub(hub, tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "stages.download", "--store", str(tmp_path / "store"), "--model", "org/tiny", "--revision", "main"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"commit {COMMIT}" in done.stdout
    missing = subprocess.run([*command[:-2], "--revision", "nope"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "revision 'nope' of hub model org/tiny does not exist" in missing.stderr
