"""The watcher's rules on one store, without running a pipeline: which drops are ready, in what order, and what a claim sees."""

from __future__ import annotations

import json

import yaml

from flows import watch
from flows.pipeline_config import load_pipeline_config
from flows.watch import CLAIMS, _copy_drop, drop_claims, ready_drops, try_claim
from stages.store import open_store
from stages.store.lease import lease_state


def test_only_a_marker_directly_in_a_drop_folder_makes_the_drop_ready(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("incoming/2026-12/part-a/_SUCCESS", b"")  # one part written by a job of its own: the drop is not complete
    store.put_bytes("incoming/2026-12/part-a/data.jsonl", b"{}\n")
    store.put_bytes("incoming/_SUCCESS", b"")  # not a drop
    store.put_bytes("incoming/2026-11/data.jsonl", b"{}\n")
    store.put_bytes("incoming/2026-11/_SUCCESS", b"")
    assert ready_drops(store, "incoming") == ["2026-11"]


def test_a_drop_copied_again_holds_only_its_files_now(tmp_path):
    """A failed attempt's local copy must not bring a file the drop's owner has since removed into the next attempt."""
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("incoming/d1/good.jsonl", b'{"text": "a"}\n')
    store.put_bytes("incoming/d1/bad.bin", b"\x00")
    target = tmp_path / "work" / "d1"
    _copy_drop(store, "incoming", "d1", target)
    (tmp_path / "store" / "incoming" / "d1" / "bad.bin").unlink()  # its owner removed it
    _copy_drop(store, "incoming", "d1", target)
    assert sorted(p.name for p in target.iterdir()) == ["good.jsonl"]


def test_a_drop_finished_by_another_watcher_while_this_one_claimed_is_not_run_again(tmp_path, monkeypatch):
    """Between try_claim's listing and its claim another watcher claimed, finished and released: the claim is given back."""
    from stages.store import claims

    store = open_store(str(tmp_path / "store"))
    acquire = claims.acquire_lease

    def finished_meanwhile(store_, folder, holder, timeout):
        other = acquire(store_, folder, {"watcher": "other"}, timeout)
        store_.put_bytes(f"{folder}/done.json", json.dumps({"run_id": "r-other"}).encode())
        other.release("succeeded")
        return acquire(store_, folder, holder, timeout)

    monkeypatch.setattr(claims, "acquire_lease", finished_meanwhile)
    assert try_claim(store, "incoming", "d1", "late", 60) == (None, "done")
    state = lease_state(store, f"{CLAIMS}/incoming/d1")
    assert state.generation == 1 and state.released["outcome"] == "skipped"
    assert drop_claims(store, "incoming", "d1").after_failure("x").startswith("failed (attempt 0 of 3")  # not a failed attempt


def test_a_drop_whose_name_the_store_cannot_hold_is_skipped_and_the_others_run(tmp_path, monkeypatch):
    store_root = tmp_path / "store"
    store = open_store(str(store_root))
    store.put_bytes("incoming/2026-12/data.jsonl", b'{"text": "a"}\n')
    store.put_bytes("incoming/2026-12/_SUCCESS", b"")
    odd = store_root / "incoming" / "2026-11\\x"  # a name S3 allows and the store's keys refuse (written around the store)
    odd.mkdir(parents=True)
    (odd / "_SUCCESS").write_bytes(b"")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"model": "m", "data": "d", "store": str(store_root)}))
    processed = []
    monkeypatch.setattr(watch, "start_prefect", lambda: None)
    monkeypatch.setattr(watch, "_process", lambda store_, config, prefix, drop, lease, work_dir: processed.append(drop))
    report = watch.watch_once(load_pipeline_config(tmp_path / "pipeline.yaml"), "incoming", 60, watcher="w")
    assert processed == ["2026-12"] and [drop for drop, _ in report.started] == ["2026-12"]
    assert report.skipped["2026-11\\x"].startswith("cannot be claimed: invalid store")


def test_two_lines_fed_by_one_prefix_each_claim_every_drop(tmp_path):
    store = open_store(str(tmp_path / "store"))
    legal, _ = try_claim(store, "incoming", "2026-12", "w1", 60, line="acme-legal")
    medical, _ = try_claim(store, "incoming", "2026-12", "w2", 60, line="acme-medical")
    assert legal is not None and medical is not None and legal.folder != medical.folder
    assert try_claim(store, "incoming", "2026-12", "w3", 60, line="acme-legal")[0] is None  # one claim per line
    assert try_claim(store, "incoming", "2026-12", "w4", 60)[0] is not None  # a watcher without a line: claims/<prefix>/
