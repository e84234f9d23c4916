"""`spectrum register`: a trained model in a real MLflow registry, by reference (S3) or as artifacts (file store)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from spectrum_cli.main import main
from stages import cpt
from stages.base.contracts import CPT
from stages.core.stage import StageContext
from stages.store import lines, load_manifest, open_store
from stages.tracking import MlflowTarget

from .mlflow_server import free_ports
from .test_cpt import SELECTION_YAML, base_model, config, corpus, drop  # noqa: F401 - the tiny model, its tokenizer and drop

pytestmark = pytest.mark.integration


def _train(store, base_model, drop, tmp_path, tracking=None):  # noqa: F811
    (tmp_path / "selection.yaml").write_text(SELECTION_YAML)
    context = StageContext(store, run_id="train", work_dir=tmp_path / "work", progress=False, tracking=tracking)
    cpt.run(config(base_model, drop, selection=str(tmp_path / "selection.yaml"), max_steps=2, save_steps=0), context)
    return load_manifest(store, "train", CPT)


def _register(capsys, store, server, *extra: str) -> tuple[int, str, str]:
    code = main(["register", "train", "--mlflow-model", "tiny-llama", "--store", store.root_uri, "--mlflow-tracking-uri", server, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _card(capsys, store) -> str:
    assert main(["card", "train", "--store", store.root_uri]) == 0
    return capsys.readouterr().out


def test_a_model_in_a_file_store_is_uploaded_and_a_line_s_production_gets_the_alias(
    base_model, drop, tmp_path, capsys, mlflow_server, mlflow_client  # noqa: F811
):
    store = open_store(str(tmp_path / "store"))
    manifest = _train(store, base_model, drop, tmp_path)
    card = _card(capsys, store)
    code, out, err = _register(capsys, store, mlflow_server.uri)
    assert code == 0, err
    [version] = mlflow_client.search_model_versions("name = 'tiny-llama'")
    assert f"registered as tiny-llama version {version.version} (with its files as artifacts" in out
    assert version.source == f"runs:/{version.run_id}/model" and version.description == card.rstrip("\n") + "\n"
    assert version.tags["spectrum.run_id"] == "train" and version.tags["spectrum.step"] == CPT
    downloaded = Path(mlflow_client.download_artifacts(version.run_id, "model", str(tmp_path / "download")))
    stored = {o["key"].split("/model/")[1]: o["sha256"] for o in manifest.outputs if "/model/" in o["key"]}
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in downloaded.iterdir()} == stored  # README.md, the card, too
    assert not mlflow_client.get_registered_model("tiny-llama").aliases
    # registering it again adds nothing; once the line promotes it, the same version becomes production
    lines.record_decision(
        store, "nightly", drop="drop-1", run_id="train", starting_model={"uri": str(base_model), "sha256": "0" * 64},
        model=f"store:runs/train/{CPT}/model", decision=lines.PROMOTED, reasons=[],
    )  # fmt: skip
    code, out, err = _register(capsys, store, mlflow_server.uri)
    assert code == 0, err
    assert "was registered already as tiny-llama version" in out and "alias production" in out and "line nightly" in out
    assert len(mlflow_client.search_model_versions("name = 'tiny-llama'")) == 1
    assert mlflow_client.get_model_version_by_alias("tiny-llama", "production").version == version.version
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    code, out, err = _register(capsys, store, down)
    assert code == 5 and f"could not register run train's model at the MLflow server {down}" in err and not out


def test_a_model_in_s3_is_registered_by_reference_under_its_tracked_run(
    base_model, drop, tmp_path, capsys, s3_store, mlflow_server, mlflow_client  # noqa: F811
):
    manifest = _train(s3_store, base_model, drop, tmp_path, tracking=MlflowTarget(mlflow_server.uri, "register-test"))
    code, out, err = _register(capsys, s3_store, mlflow_server.uri, "--mlflow-experiment", "register-test")
    assert code == 0, err
    [version] = [v for v in mlflow_client.search_model_versions("name = 'tiny-llama'") if v.source.startswith("s3://")]
    assert version.source == s3_store.uri(f"runs/train/{CPT}/model") and "(by reference: s3://" in out
    assert version.run_id == manifest.tracking["mlflow"]["run_id"]  # the registry links to the training's curves


def test_registering_without_a_server_or_with_one_down_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = open_store(str(tmp_path / "store"))
    assert main(["register", "train", "--mlflow-model", "m", "--store", store.root_uri]) == 2
    assert "no MLflow server to register in" in capsys.readouterr().err
    down = f"http://127.0.0.1:{free_ports(1)[0]}"
    assert main(["register", "train", "--mlflow-model", "m", "--store", store.root_uri, "--mlflow-tracking-uri", down]) == 2
    assert "run 'train' has no committed cpt step" in capsys.readouterr().err  # the store is read before the server
    for bad in ("", "it's", "_under", "a" * 251):  # refused before the store is read
        assert main(["register", "train", "--mlflow-model", bad, "--store", store.root_uri, "--mlflow-tracking-uri", down]) == 2
        assert f"--mlflow-model {bad!r} is not a model name" in capsys.readouterr().err
