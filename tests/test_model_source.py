"""Content-addressed trees in the store: naming, publishing, listings, and materializing them back to local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.base.errors import InputError
from stages.store import IntegrityError, open_store
from stages.store.trees import (
    ListedFile,
    Listing,
    listing_key,
    materialize,
    publish_tree,
    resolve_uri,
    tree_prefix,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "spectrum-cache"
    monkeypatch.setenv("SPECTRUM_CACHE", str(cache))
    return cache


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


FILES = {"config.json": b'{"a": 1}', "model.safetensors": b"\x00" * 1000, "nested/vocab.txt": b"a\nb\n"}


def published(store, tmp_path, files=FILES, kind="models"):
    folder = make_folder(tmp_path / "source", files)
    listing = Listing.of_folder(kind, folder, sorted(files))
    return folder, publish_tree(store, listing, folder, progress=False)


def test_tree_name_depends_on_content_only():
    a = Listing("models", (ListedFile("b", "1" * 64, 1), ListedFile("a", "2" * 64, 2)))
    b = Listing("models", (ListedFile("a", "2" * 64, 2), ListedFile("b", "1" * 64, 1)))
    assert a.tree == b.tree and a.to_json() == b.to_json()
    assert a.tree.startswith("sha256-") and len(a.tree) == 7 + 64
    assert Listing("models", (ListedFile("a", "2" * 64, 3), ListedFile("b", "1" * 64, 1))).tree != a.tree
    assert Listing("models", (ListedFile("c", "2" * 64, 2), ListedFile("b", "1" * 64, 1))).tree != a.tree


def test_listing_round_trip_and_tamper_detection():
    listing = Listing("data", (ListedFile("x.jsonl", "3" * 64, 5),))
    assert Listing.from_json(listing.to_json(), "here") == listing
    document = json.loads(listing.to_json())
    document["files"][0]["size"] = 6
    with pytest.raises(IntegrityError, match="altered"):
        Listing.from_json(json.dumps(document).encode(), "here")
    with pytest.raises(InputError, match="not a valid listing"):
        Listing.from_json(b"[]", "here")


def test_publish_lays_out_a_normal_folder_and_writes_the_listing_last(store, tmp_path):
    _, stored = published(store, tmp_path)
    prefix = tree_prefix("models", stored.tree)
    assert store.list(prefix + "/") == [f"{prefix}/{name}" for name in sorted(FILES)]
    assert stored.objects[-1].key == listing_key("models", stored.tree)
    assert [o.key for o in stored.objects[:-1]] == [f"{prefix}/{name}" for name in sorted(FILES)]
    assert stored.uri == store.uri(prefix)
    for name, data in FILES.items():
        assert store.get_bytes(f"{prefix}/{name}") == data


def test_publishing_the_same_content_again_stores_nothing_new(store, tmp_path):
    _, first = published(store, tmp_path)
    keys = store.list()
    _, second = published(store, tmp_path / "again")
    assert second.tree == first.tree
    assert store.list() == keys
    assert [o.sha256 for o in second.objects] == [o.sha256 for o in first.objects]


def test_materialize_round_trip_in_every_uri_form(store, tmp_path, private_cache):
    _, stored = published(store, tmp_path)
    for uri in (stored.uri, f"store:models/{stored.tree}", f"store:models/{stored.tree}/"):
        local = materialize(uri, store)
        assert local == private_cache / stored.tree
        assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == FILES


def test_materialize_reuses_a_complete_cache_folder(store, tmp_path):
    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, store)
    stamps = {p: p.stat().st_mtime_ns for p in local.rglob("*")}
    assert materialize(stored.uri, store) == local
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*")} == stamps


def test_a_damaged_cache_folder_is_rebuilt(store, tmp_path):
    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, store, cache_dir=tmp_path / "cache")
    (local / "model.safetensors").write_bytes(b"short")
    assert materialize(stored.uri, store, cache_dir=tmp_path / "cache") == local
    assert (local / "model.safetensors").read_bytes() == FILES["model.safetensors"]


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_cache_file_changed_in_place_is_fetched_again(store, tmp_path, name):
    """Same size, other bytes: only hashing tells, and the damaged copy is replaced from the store, never used."""
    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, store, cache_dir=tmp_path / "cache")
    path = local / name
    path.write_bytes(bytes(b ^ 0xFF for b in FILES[name]))
    assert path.stat().st_size == len(FILES[name])
    assert materialize(stored.uri, store, cache_dir=tmp_path / "cache") == local
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == FILES


def test_a_cache_file_replaced_by_a_link_is_fetched_again(store, tmp_path):
    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, store, cache_dir=tmp_path / "cache")
    elsewhere = make_folder(tmp_path / "elsewhere", {"config.json": FILES["config.json"]})
    (local / "config.json").unlink()
    (local / "config.json").symlink_to(elsewhere / "config.json")
    assert materialize(stored.uri, store, cache_dir=tmp_path / "cache") == local
    assert not (local / "config.json").is_symlink() and (local / "config.json").read_bytes() == FILES["config.json"]


def test_a_full_uri_needs_no_store_object(store, tmp_path):
    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, None)
    assert (local / "config.json").read_bytes() == FILES["config.json"]


def test_local_folders_are_returned_unchanged(tmp_path):
    folder = make_folder(tmp_path / "plain", {"a.txt": b"x"})
    assert materialize(str(folder), None) == folder
    assert materialize(folder.as_uri(), None) == folder
    with pytest.raises(InputError, match="not a folder"):
        materialize(str(tmp_path / "missing"), None)


def test_a_tree_without_its_listing_is_incomplete(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    tree = "sha256-" + "0" * 64
    store.put_bytes(f"models/{tree}/config.json", b"{}")
    with pytest.raises(InputError, match="has no listing.*did not finish"):
        materialize(f"store:models/{tree}", store)
    with pytest.raises(InputError, match="has no listing"):
        materialize(store.uri(f"models/{tree}"), None)


def test_a_corrupt_object_is_refused_and_leaves_no_cache_folder(tmp_path, private_cache):
    store = open_store((tmp_path / "store").as_uri())
    _, stored = published(store, tmp_path)
    stored_file = tmp_path / "store" / "models" / stored.tree / "model.safetensors"
    stored_file.chmod(0o644)
    stored_file.write_bytes(b"\x01" * 1000)
    with pytest.raises(IntegrityError, match="sha256"):
        materialize(stored.uri, store)
    assert not (private_cache / stored.tree).exists()
    assert [p.name for p in private_cache.iterdir()] == []


def test_a_listing_for_another_tree_is_refused(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    _, stored = published(store, tmp_path)
    other = "sha256-" + "1" * 64
    store.put_bytes(listing_key("models", other), store.get_bytes(listing_key("models", stored.tree)))
    with pytest.raises(IntegrityError, match="describes"):
        materialize(f"store:models/{other}", store)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("store:runs/x/download/download.json", "run 'x' has no committed manifest for stage 'download'"),
        ("store:models/sha256-abc", "not a stored model or data drop"),
        ("http://example.com/models/x", "unsupported URI scheme"),
    ],
)
def test_uris_that_name_no_tree(tmp_path, uri, message):
    store = open_store((tmp_path / "store").as_uri())
    with pytest.raises(InputError, match=message):
        materialize(uri, store)


def test_store_form_needs_a_store():
    with pytest.raises(InputError, match="no store was given"):
        resolve_uri("store:models/x", None)


def test_a_run_folder_that_the_stage_did_not_write_or_that_failed_is_a_clear_error(tmp_path):
    from stages.store import commit_manifest, output_key, start_manifest

    store = open_store((tmp_path / "store").as_uri())
    model = store.put_bytes(output_key("done", "cpt", "model/model.safetensors"), b"weights")
    commit_manifest(store, start_manifest("cpt", "1", "done", {}, [model]).finish([model]))
    commit_manifest(store, start_manifest("cpt", "1", "broken", {}, [model]).finish([], status="failed"))
    with pytest.raises(InputError, match="names no output of the cpt stage of run done"):
        materialize("store:runs/done/cpt/checkpoints", store)
    with pytest.raises(InputError, match="the cpt stage of run broken failed; .* holds nothing to use"):
        materialize("store:runs/broken/cpt/model", store)
    assert (materialize("store:runs/done/cpt/model", store) / "model.safetensors").read_bytes() == b"weights"


def test_a_good_copy_installed_by_another_process_is_never_moved_away(store, tmp_path, monkeypatch):
    """B judged the cache damaged, then A installed a whole copy: B, holding the tree's lock now, keeps A's copy."""
    import threading

    from stages.store import trees

    _, stored = published(store, tmp_path)
    cache = tmp_path / "cache"
    local = materialize(stored.uri, store, cache_dir=cache)
    (local / "model.safetensors").write_bytes(b"short")  # damaged: both A and B fetch
    a_installing, b_judged = threading.Event(), threading.Event()
    real_install = trees._install_locked

    def install(staging, target, listing):
        if threading.current_thread().name == "A":
            a_installing.set()
            assert b_judged.wait(30)  # B has found the damage and now asks for the lock A holds
        real_install(staging, target, listing)

    def slow_materialize(name):
        if name == "B":
            assert a_installing.wait(30)
            b_judged.set()
        results[name] = materialize(stored.uri, store, cache_dir=cache)
        folder = results[name]
        results[name + "-files"] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    results: dict = {}
    monkeypatch.setattr(trees, "_install_locked", install)
    threads = [threading.Thread(target=slow_materialize, args=(n,), name=n) for n in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["A"] == results["B"] == local
    assert results["A-files"] == results["B-files"] == FILES
    assert not list(cache.glob(".damaged-*")) and not list(cache.glob(".partial-*"))


def test_a_cache_folder_moved_away_while_it_is_checked_is_not_complete(store, tmp_path, monkeypatch):
    """The unlocked check races another process's install: a file vanishing between is_file and stat means fetch."""
    from stages.store import trees

    _, stored = published(store, tmp_path)
    local = materialize(stored.uri, store, cache_dir=tmp_path / "cache")
    listing = Listing.of_folder("models", local, sorted(FILES))
    assert trees._complete(local, listing)
    real_stat, calls = Path.stat, {"n": 0}

    def vanishing_stat(self, *args, **kwargs):
        if self.name == "model.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:  # is_file saw it; the size check that follows finds it gone
                raise FileNotFoundError(str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing_stat)
    assert trees._complete(local, listing) is False and calls["n"] == 2
