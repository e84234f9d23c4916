"""Constants and helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from stages.core.stage import StageContext

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

    real = engine.singular_values
    calls = {"n": 0}

    def counting(*args, **kwargs):
        if calls["n"] >= count:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "singular_values", counting)


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
