"""Constants and helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stages.core.stage import StageContext

if TYPE_CHECKING:
    import pyarrow as pa

    from stages.layer_select import SelectConfig
    from stages.snr_scan import ScanConfig

QUIET = StageContext(progress=False)  # a local run without progress bars

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE_SNR = FIXTURES / "reference-snr"
LLAMA_JSON = REFERENCE_SNR / "snr_results_meta-llama-Meta-Llama-3.1-8B-Instruct.json"
LLAMA_YAML_50 = REFERENCE_SNR / "snr_results_meta-llama-Meta-Llama-3.1-8B-Instruct_unfrozenparameters_50percent.yaml"
TINYLLAMA_JSON = REFERENCE_SNR / "snr_results_TinyLlama-TinyLlama-v1.1.json"

# Small enough to build and scan in well under a second.
TINY = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def venv_bin(name: str) -> str:
    """An executable installed next to the running interpreter (the venv's `spectrum`)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed next to {sys.executable}; install the package (pip install -e .)")
        return found
    return str(path)


def interrupt_scan_after(monkeypatch, count: int) -> None:
    """Make the scan stop (as on Ctrl-C) when it is about to decompose the (count+1)-th matrix."""
    from stages.scan import engine

    real = engine.matrix_stats  # every matrix, streamed or read whole, is decomposed through it
    calls = {"n": 0}

    def counting(*args, **kwargs):
        if calls["n"] >= count:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "matrix_stats", counting)


def hub_cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """Lay `files` out as the Hugging Face hub cache does, and return the snapshot folder.

    `<cache>/models--org--name/snapshots/<commit>/<file>` is a relative symbolic link to
    `<cache>/models--org--name/blobs/<sha256>`, which holds the bytes.
    """
    import hashlib
    import os

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a `spectrum` child process: this test process's own DeepSpeed rendezvous
    variables (set by in-process training, naming a port its process group holds) are left out."""
    import os

    from stages.core.process import RENDEZVOUS_VARIABLES

    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}, **extra}


# --- running the CLI and the scan ----------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `spectrum ARGV` run in-process."""
    from spectrum_cli.main import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stage_cli(capsys, stage, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one stage's command line (`python -m stages.<stage> ARGV`) run in-process."""
    from stages.core.cli import stage_main

    code = stage_main(stage, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def no_decomposition(monkeypatch) -> None:
    """Fail the test if a matrix is decomposed (the work should have been reused)."""
    from stages.scan import engine

    def boom(*args, **kwargs):
        raise AssertionError("a matrix was decomposed although the work should have been reused")

    monkeypatch.setattr(engine, "matrix_stats", boom)


LLAMA_TYPES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def scan(model: Path, out: Path, progress: bool = False, **options):
    """snr_scan `model` into the local table `out`; the ScanResult."""
    from stages.snr_scan import ScanConfig, run

    return run(ScanConfig(model_dir=str(model), output=str(out), **options), StageContext(progress=progress)).detail


def rows_of(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def without(rows: list[dict], *columns: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["tensor_name"]: r for r in rows}


def partial_journal(out: Path) -> Path:
    """The journal of the rows a scan into `out` has finished (what a resumed scan reuses)."""
    return out.with_name(out.name + ".partial.jsonl")


# --- scanning into a store -----------------------------------------------------------------------


MODEL_ID = "tiny-llama"
SNR_KEY = "tables/snr/stage=snr_scan/run_id={run}/part-0.parquet"


def scan_config(model: Path, **overrides) -> ScanConfig:
    from stages.snr_scan import ScanConfig

    options = {"model_dir": str(model), "output": None, "model_id": MODEL_ID, "workers": 1}
    return ScanConfig(**{**options, **overrides})


def store_scan(store, model: Path, work_dir: Path, run_id=None, force=False, **overrides):
    """(the stage result, the scan's rows or None when a committed run was reused)"""
    context = StageContext(store, run_id=run_id, force=force, work_dir=work_dir, progress=False)
    from stages import snr_scan

    result = snr_scan.run(scan_config(model, **overrides), context)
    return result, result.detail


def store_config(run: str, **overrides) -> SelectConfig:
    from stages.layer_select import SelectConfig

    return SelectConfig(**{"snr_input": None, "out_dir": None, "snr_run": run, **overrides})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_of(data: bytes) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data))


def snapshot(store) -> dict[str, bytes]:
    """Every object the store lists, with its bytes (and, for a file store, every file under the root)."""
    from stages.store import FileStore

    objects = {key: store.get_bytes(key) for key in store.list("")}
    if isinstance(store, FileStore):
        root = Path(store.root_uri.removeprefix("file://"))
        objects.update({f"<file>{p.relative_to(root)}": p.read_bytes() for p in root.rglob("*") if p.is_file()})
    return objects


# --- the download stage ----------------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


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


def local_store(tmp_path):
    from stages.store import open_store

    return open_store((tmp_path / "store").as_uri())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


def write_drop(folder: Path) -> Path:
    """A data drop of every file kind: text, JSON Lines, a JSON array and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "part1").mkdir(parents=True)
    (folder / "notes.txt").write_text("first line\nsecond line — ü\n\n", encoding="utf-8")
    (folder / "part1" / "chat.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (folder / "meta.json").write_text('[{"text": "c"}, {"text": "d"}, {"text": "e"}]')
    pq.write_table(pa.table({"text": ["f", "g", "h", "i"]}), folder / "part1" / "rows.parquet")
    return folder
