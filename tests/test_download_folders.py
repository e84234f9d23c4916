"""The download stage from local folders and the store: round trips, refusals, symbolic links out of a source, the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from stages.base.errors import CorruptWeightsError, InputError
from stages.core.cli import stage_main
from stages.core.stage import StageContext
from stages.download import STAGE, DownloadConfig, read_summary, run
from stages.store.trees import materialize

from .helpers import (
    COMMIT,
    closed_port_url,
    folder_bytes,
    forbid_network,
    hub_cache_snapshot,
    isolated_environment,  # noqa: F401  (fixture)
    local_store,
    write_drop,
)


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


def test_model_and_data_in_one_run(model_dir, tmp_path):
    store = local_store(tmp_path)
    outcome = run(DownloadConfig(model=str(model_dir), data=str(write_drop(tmp_path / "drop"))), StageContext(store, progress=False))
    summary = read_summary(store, outcome.manifest)
    assert set(summary) == {"model", "data"}
    assert summary["model"]["uri"].endswith(f"/models/{summary['model']['tree']}")
    assert summary["data"]["uri"].endswith(f"/data/{summary['data']['tree']}")


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
