"""Reading manifests: one unreadable or newer manifest does not break the store."""

from __future__ import annotations

import json

import pytest

from stages.base.contracts import SNR_SCAN
from stages.store import find_manifest, load_manifest, open_store
from stages.store.lineage import audit_run, list_run_summaries

from .helpers import cli, no_decomposition, store_scan

# --- 4. one unreadable or newer manifest does not break the store ---------------------------------


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not-an-object", "missing-fields", "stray-layout", "bad-run-name"],
)
def test_an_unreadable_manifest_is_skipped_with_a_warning(store, tiny_model, tmp_path, monkeypatch, capsys, damage):
    good, _ = store_scan(store, tiny_model, tmp_path / "work")
    damaged = {
        "truncated": ("runs/20990101T000000Z-aaaaaaaa/snr_scan/manifest.json", b'{"stage": "snr_scan", "run_'),
        "not-an-object": ("runs/20990101T000000Z-bbbbbbbb/snr_scan/manifest.json", b"[1, 2, 3]"),
        "missing-fields": ("runs/20990101T000000Z-cccccccc/snr_scan/manifest.json", b'{"stage": "snr_scan"}'),
        "stray-layout": ("runs/notes/manifest.json", b"{}"),
        "bad-run-name": ("runs/_hidden-run/snr_scan/manifest.json", b"{}"),
    }[damage]
    store.put_bytes(*damaged)
    # a stray file under runs/ never mattered, and still does not
    store.put_bytes("runs/README.txt", b"hand-written notes")
    # spectrum runs: the good run is listed, the damaged one named in a warning
    code, out, err = cli(capsys, "runs", "--store", store.root_uri)
    assert code == 0, err
    assert good.run_id in out
    if damage in ("truncated", "not-an-object", "missing-fields", "stray-layout"):
        assert "warning:" in err and "manifest.json" in err
    assert [s["run_id"] for s in list_run_summaries(store)] == [good.run_id]
    # audit of the good run, and a cache lookup, still work
    assert audit_run(store, good.run_id)["run_id"] == good.run_id
    no_decomposition(monkeypatch)
    again, _ = store_scan(store, tiny_model, tmp_path / "work")
    assert again.cached and again.run_id == good.run_id


def test_a_manifest_from_a_newer_version_is_read_and_its_unknown_fields_kept(tmp_path, tiny_model, monkeypatch):
    store = open_store((tmp_path / "store").as_uri())
    first, _ = store_scan(store, tiny_model, tmp_path / "work")
    path = tmp_path / "store" / "runs" / first.run_id / SNR_SCAN / "manifest.json"
    document = json.loads(path.read_text())
    document["attestation"] = {"signed_by": "ci", "format": 2}
    path.chmod(0o644)
    path.write_text(json.dumps(document))
    manifest = load_manifest(store, first.run_id, SNR_SCAN)
    assert manifest.extra == {"attestation": {"signed_by": "ci", "format": 2}}
    assert json.loads(manifest.to_json())["attestation"] == {"signed_by": "ci", "format": 2}
    assert find_manifest(store, SNR_SCAN, manifest.cache_key).run_id == first.run_id
    no_decomposition(monkeypatch)
    assert store_scan(store, tiny_model, tmp_path / "work")[0].cached
