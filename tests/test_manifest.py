"""Manifests: commit marker, cache key, lookup by key, and no secrets ever."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from stages.base.contracts import FAILED
from stages.base.errors import InputError, OutputExistsError
from stages.store import (
    ArtifactNotFoundError,
    Manifest,
    SecretLeakError,
    cache_key,
    commit_manifest,
    find_manifest,
    list_runs,
    load_manifest,
    manifest_key,
    new_run_id,
    output_key,
    resolve_run_reference,
    start_manifest,
)

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def run_stage(store, run_id: str, parameters: dict, stage: str = "layer_select", status: str = "succeeded") -> Manifest:
    """What a stage does: start the manifest, store outputs, commit the manifest last."""
    model = store.put_bytes("blobs/model.safetensors", b"weights")
    manifest = start_manifest(stage, "1.2.0", run_id, parameters, [model])
    output = store.put_bytes(output_key(run_id, stage, "selection.json"), json.dumps(parameters).encode())
    finished = manifest.finish([output], status=status)
    commit_manifest(store, finished)
    return finished


def test_cache_key_depends_on_exactly_what_determines_the_outputs():
    base = cache_key("snr_scan", "1.0", {"a": 1, "b": [1, 2]}, [SHA_A])

    assert cache_key("snr_scan", "1.0", {"b": [1, 2], "a": 1}, [SHA_A]) == base  # key order is irrelevant
    assert len(base) == 64
    assert cache_key("layer_select", "1.0", {"a": 1, "b": [1, 2]}, [SHA_A]) != base
    assert cache_key("snr_scan", "1.1", {"a": 1, "b": [1, 2]}, [SHA_A]) != base
    assert cache_key("snr_scan", "1.0", {"a": 2, "b": [1, 2]}, [SHA_A]) != base
    assert cache_key("snr_scan", "1.0", {"a": 1, "b": [1, 2]}, [SHA_B]) != base
    assert cache_key("snr_scan", "1.0", {}, [SHA_A, SHA_B]) != cache_key("snr_scan", "1.0", {}, [SHA_B, SHA_A])
    assert cache_key("s", "1", {}, {"model": SHA_A, "data": SHA_B}) == cache_key("s", "1", {}, {"data": SHA_B, "model": SHA_A})


def test_cache_key_refuses_values_that_are_not_json():
    with pytest.raises(InputError, match="plain JSON"):
        cache_key("s", "1", {"x": float("nan")}, [])
    with pytest.raises(InputError, match="plain JSON"):
        cache_key("s", "1", {"x": object()}, [])


def test_manifest_round_trip(store):
    manifest = run_stage(store, "run-1", {"top_percent": 25, "policy": "per-type"})
    loaded = load_manifest(store, "run-1", "layer_select")

    assert loaded == manifest
    assert loaded.status == "succeeded" and loaded.host and loaded.seconds >= 0
    assert loaded.inputs[0]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert loaded.outputs[0]["uri"] == store.uri("runs/run-1/layer_select/selection.json")
    assert loaded.outputs[0]["size"] == len(json.dumps({"top_percent": 25, "policy": "per-type"}))
    assert store.exists(manifest_key("run-1", "layer_select"))


def test_list_runs_and_missing_manifests(store):
    run_stage(store, "run-1", {"top_percent": 25})
    run_stage(store, "run-1", {}, stage="snr_scan")
    run_stage(store, "run-2", {"top_percent": 50})
    store.put_bytes(output_key("run-3", "layer_select", "selection.json"), b"{}")  # never committed

    assert list_runs(store) == {"run-1": ["snr_scan", "layer_select"], "run-2": ["layer_select"]}  # pipeline order
    with pytest.raises(ArtifactNotFoundError, match="no committed manifest"):
        load_manifest(store, "run-3", "layer_select")


def test_find_manifest_by_cache_key(store):
    first = run_stage(store, "run-1", {"top_percent": 25})
    other = run_stage(store, "run-2", {"top_percent": 50})
    forced = run_stage(store, "run-3", {"top_percent": 25})  # a forced re-run: same key, new run

    assert first.cache_key == forced.cache_key != other.cache_key
    assert find_manifest(store, "layer_select", first.cache_key).run_id == "run-3"
    assert find_manifest(store, "layer_select", other.cache_key).run_id == "run-2"
    assert find_manifest(store, "snr_scan", first.cache_key) is None
    assert find_manifest(store, "layer_select", "0" * 64) is None
    with pytest.raises(InputError, match="cache key"):
        find_manifest(store, "layer_select", "../../etc")


def test_a_step_lives_in_its_run_and_shares_the_stage_cache(store):
    """A stage run again within a run (`layer_select.sft`) has its own folder; its work is the stage's to reuse."""
    plain = run_stage(store, "run-1", {"top_percent": 25})
    step = run_stage(store, "run-1", {"top_percent": 50}, stage="layer_select.sft")
    assert list_runs(store) == {"run-1": ["layer_select", "layer_select.sft"]}
    assert load_manifest(store, "run-1", "layer_select.sft").cache_key == step.cache_key
    assert step.cache_key == cache_key("layer_select", "1.2.0", {"top_percent": 50}, [hashlib.sha256(b"weights").hexdigest()])
    assert find_manifest(store, "layer_select", step.cache_key).stage == "layer_select.sft"
    assert find_manifest(store, "layer_select.sft", plain.cache_key).stage == "layer_select"
    assert store.exists(f"cache/layer_select/{step.cache_key}/layer_select.sft/run-1.json")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [("run-1", ("run-1", "layer_select")), ("run-1/layer_select.sft", ("run-1", "layer_select.sft"))],
)
def test_run_references_name_a_run_and_optionally_a_step(reference, expected):
    assert resolve_run_reference(reference, "layer_select", "--selection-run") == expected


@pytest.mark.parametrize(
    ("reference", "message"),
    [("run-1/snr_scan.sft", "names a snr_scan step"), ("../x", "invalid run id"), ("run-1/a/b", "invalid step")],
)
def test_bad_run_references_are_clear_errors(reference, message):
    with pytest.raises(InputError, match=message):
        resolve_run_reference(reference, "layer_select", "--selection-run")


def test_failed_runs_are_recorded_but_never_reused(store):
    failed = run_stage(store, "run-1", {"top_percent": 25}, status=FAILED)

    assert load_manifest(store, "run-1", "layer_select").status == FAILED
    assert find_manifest(store, "layer_select", failed.cache_key) is None


def test_a_committed_manifest_is_final(store):
    manifest = run_stage(store, "run-1", {"top_percent": 25})

    commit_manifest(store, manifest)  # identical: a no-op (a retried commit)
    with pytest.raises(OutputExistsError):
        commit_manifest(store, manifest.finish([], status=FAILED))
    assert load_manifest(store, "run-1", "layer_select") == manifest


def test_commit_refuses_unfinished_or_inconsistent_manifests(store):
    manifest = start_manifest("snr_scan", "1.0", "run-1", {"estimator": "reference"}, [])
    with pytest.raises(InputError, match="finish"):
        commit_manifest(store, manifest)
    tampered = replace(manifest.finish([]), parameters={"estimator": "gavish-donoho"})
    with pytest.raises(InputError, match="cache key"):
        commit_manifest(store, tampered)
    assert store.list() == []


def test_bad_names_and_inputs_are_refused():
    with pytest.raises(InputError, match="run id"):
        start_manifest("snr_scan", "1.0", "../run", {}, [])
    with pytest.raises(InputError, match="stage name"):
        start_manifest("snr scan", "1.0", "run-1", {}, [])
    with pytest.raises(InputError, match="sha256"):
        start_manifest("snr_scan", "1.0", "run-1", {}, [{"uri": "file:///x", "sha256": "abc"}])
    with pytest.raises(InputError, match="reserved"):
        output_key("run-1", "snr_scan", "manifest.json")


def test_corrupt_manifest_gives_a_clear_error(store):
    store.put_bytes(manifest_key("run-1", "snr_scan"), b"{not json")
    with pytest.raises(InputError, match="not a valid manifest"):
        load_manifest(store, "run-1", "snr_scan")


def test_run_ids_sort_by_time_and_are_valid_names():
    first, second = new_run_id(), new_run_id()
    assert first != second and len(first) == len("20260101T120000Z-1a2b3c4d")
    start_manifest("snr_scan", "1.0", first, {}, [])


# --- no secrets, ever -----------------------------------------------------------------------

SECRET_NAMES = [
    {"hf_token": "x"},
    {"password": "x"},
    {"AWS_SECRET_ACCESS_KEY": "x"},
    {"aws_access_key_id": "x"},
    {"apiKey": "x"},
    {"Authorization": "x"},
    {"hub": {"auth_token": "x"}},
    {"servers": [{"db_password": "x"}]},
]
SECRET_VALUES = [
    {"note": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},  # AWS secret access key shape
    {"note": "AKIAIOSFODNN7EXAMPLE"},  # AWS access key id
    {"source": "https://user:hunter22@example.com/data"},
    {"header": "Bearer eyJhbGciOiJIUzI1NiJ9.payload"},
    {"nested": ["hf_abcdefghijklmnopqrstuvwxyz0123456789"]},
]
HARMLESS = {
    "max_tokens": 2048,
    "tokenizer": "local",
    "cache_key_version": 2,
    "top_percent": 25,
    "revision": "0123456789abcdef0123456789abcdef01234567",  # a git commit
    "module": "model.layers.0.self_attn.k_proj",
    "data": "s3://bucket/drops/2026-01-01/part-0.parquet",
}


@pytest.mark.parametrize("parameters", SECRET_NAMES + SECRET_VALUES, ids=lambda p: next(iter(p)))
def test_parameters_that_look_like_secrets_are_refused_without_echoing_them(parameters):
    with pytest.raises(SecretLeakError, match="never hold secrets") as error:
        start_manifest("download", "1.0", "run-1", parameters, [])
    assert "hunter22" not in str(error.value) and "EXAMPLEKEY" not in str(error.value)


def test_harmless_parameters_pass():
    assert start_manifest("download", "1.0", "run-1", HARMLESS, []).parameters == HARMLESS


def test_the_value_of_a_secret_environment_variable_is_refused_anywhere(monkeypatch, store):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    with pytest.raises(SecretLeakError, match="MY_SERVICE_TOKEN"):
        start_manifest("download", "1.0", "run-1", {"url": "https://x/?t=s3cr3t-value-123"}, [])

    manifest = start_manifest("download", "1.0", "run-1", {}, [{"uri": "https://h/s3cr3t-value-123", "sha256": SHA_A}])
    with pytest.raises(SecretLeakError, match="MY_SERVICE_TOKEN"):
        commit_manifest(store, manifest.finish([]))
    assert store.list() == []


@pytest.mark.integration
def test_nothing_written_to_s3_holds_the_credentials(s3_env, s3_store):
    run_stage(s3_store, "run-1", {"top_percent": 25, "endpoint": s3_env.endpoint_url})
    for key in s3_store.list():
        data = s3_store.get_bytes(key).decode(errors="replace")
        assert s3_env.secret_key not in data and s3_env.access_key not in data
