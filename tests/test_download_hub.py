"""The download stage from the hub (a local fake of its HTTP API): commits, retries, refusals, offline mode, sharded models."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import string
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.download import DownloadConfig, read_summary, run
from stages.snr_scan import ScanConfig
from stages.snr_scan import run as snr_scan_run
from stages.store.trees import materialize
from stages.weights.checkpoint import INDEX_FILE
from stages.weights.hub import HubUnavailableError

from .helpers import (
    COMMIT,
    REPO_ROOT,
    closed_port_url,
    folder_bytes,
    forbid_network,
    hub_cache_snapshot,
    isolated_environment,  # noqa: F401  (fixture)
    local_store,
)

OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


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
