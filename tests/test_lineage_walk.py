"""The one lineage walk (stages/store/lineage.py) that `spectrum audit` and `spectrum report` share."""

from __future__ import annotations

from dataclasses import replace

from stages.store.lineage import Producers, ancestors
from stages.store.manifest import start_manifest

SHA = "0" * 64


def ref(uri: str) -> dict:
    return {"uri": uri, "sha256": SHA}


def stage(run: str, name: str, inputs: list[str], outputs: list[str], status: str = "succeeded"):
    manifest = start_manifest(name, "1.0", run, {}, [ref(uri) for uri in inputs])
    return replace(manifest, outputs=[{"uri": uri, "sha256": SHA, "key": uri} for uri in outputs], status=status)


def store_of(*manifests) -> dict:
    runs: dict[str, list] = {}
    for manifest in manifests:
        runs.setdefault(manifest.run_id, []).append(manifest)
    return runs


SCAN = stage("scan", "snr_scan", ["file:///model"], ["s:scan/table"])
SELECT = stage("select", "layer_select", ["s:scan/table"], ["s:select/json"])
CPT = stage("train", "cpt", ["file:///model", "s:select/json"], ["s:train/model"])
EVALUATE = stage("train", "evaluate", ["s:train/model", "s:train/model"], ["s:train/eval"])
FAILED = stage("broken", "cpt", [], ["s:select/json"], status="failed")  # a failed stage produced nothing


def test_the_walk_lists_the_start_then_the_producers_nearest_first_each_once_with_their_parents():
    producers = Producers(store_of(SCAN, SELECT, CPT, EVALUATE, FAILED))
    nodes = producers.walk([CPT, EVALUATE])
    assert [node.key for node in nodes] == [("train", "cpt"), ("train", "evaluate"), ("select", "layer_select"), ("scan", "snr_scan")]
    assert [node.parents for node in nodes] == [(("select", "layer_select"),), (("train", "cpt"),), (("scan", "snr_scan"),), ()]
    assert ancestors(nodes, ("train", "evaluate")) == {("train", "cpt"), ("select", "layer_select"), ("scan", "snr_scan")}
    assert ancestors(nodes, ("scan", "snr_scan")) == set() and ancestors(nodes, ("nowhere", "cpt")) == set()


def test_the_walk_skips_an_excluded_run_and_does_not_follow_it():
    producers = Producers(store_of(SCAN, SELECT, CPT, EVALUATE))
    assert producers.of(EVALUATE.inputs) == [CPT, CPT]
    assert producers.walk(producers.of(EVALUATE.inputs), exclude_run="train") == []  # the audit's own run is not its lineage
    assert [node.key for node in producers.walk(producers.of(CPT.inputs), exclude_run="train")] == [
        ("select", "layer_select"),
        ("scan", "snr_scan"),
    ]


def test_a_stage_reading_its_own_output_is_not_its_own_parent():
    loop = stage("loop", "cpt", ["s:loop/model"], ["s:loop/model"])
    (node,) = Producers(store_of(loop)).walk([loop])
    assert node.parents == ()
