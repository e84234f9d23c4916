"""Device time (stages/store/compute.py): what a manifest records, how it is summed and priced, and the shared price flag."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest

from spectrum_cli.prices import add_price_argument, parse_prices, prices_from_args
from stages.base.errors import InputError
from stages.core.execution import Produced, execute_stage
from stages.core.stage import StageContext
from stages.store import load_manifest, open_store, record_reuse, start_manifest
from stages.store.compute import Prices, Usage, begin_compute, compute_record, describe_usage, reused_compute, usage
from stages.store.manifest import Manifest, _load_own_manifest

HOUR = 3600.0


def fake_torch(initialized: bool, count: int = 8, name: str = "NVIDIA H200", allocated: int = 1024) -> types.ModuleType:
    """A loaded torch whose CUDA is available; `initialized`: this process has used it; `allocated`: its peak since the reset."""
    peak = {"bytes": allocated}
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: initialized,
        device_count=lambda: count,
        current_device=lambda: 0,
        get_device_name=lambda index: name,
        max_memory_allocated=lambda: peak["bytes"],
        reset_peak_memory_stats=lambda: peak.update(bytes=0),
    )
    return types.SimpleNamespace(cuda=cuda)


def compute(device: str, device_seconds: float) -> dict:
    return {"device": device, "device_name": None, "device_count": 1, "seconds": device_seconds, "device_seconds": device_seconds}


def test_a_stage_on_this_cpu_machine_records_one_cpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    record = compute_record(12.5)
    assert record == {"device": "cpu", "device_name": None, "device_count": 1, "seconds": 12.5, "device_seconds": 12.5}
    assert compute_record(-1.0)["device_seconds"] == 0.0  # a clock that stepped back costs nothing, never a negative


def test_a_distributed_run_counts_its_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert compute_record(10.0) | {"device_name": None} == {
        "device": "cpu",
        "device_name": None,
        "device_count": 4,
        "seconds": 10.0,
        "device_seconds": 40.0,
    }
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True))
    cuda = {"device": "cuda", "device_name": "NVIDIA H200", "device_count": 4, "seconds": 10.0, "device_seconds": 40.0}
    assert compute_record(10.0) == cuda


def test_cuda_counts_only_when_the_process_used_it(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert compute_record(5.0)["device"] == "cpu"  # a CPU stage on a GPU machine: CUDA available, never used
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=True, count=8))
    # one process uses one device, however many the machine has
    assert compute_record(5.0) == {"device": "cuda", "device_name": "NVIDIA H200", "device_count": 1, "seconds": 5.0, "device_seconds": 5.0}
    begin_compute()  # a later stage of the same process that allocates nothing on the GPU ran on the CPU
    assert compute_record(5.0)["device"] == "cpu"


def test_a_reuse_keeps_the_device_and_costs_nothing():
    assert reused_compute(compute("cuda", 99.0)) == {**compute("cuda", 99.0), "seconds": 0.0, "device_seconds": 0.0}
    assert reused_compute(None) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (4.5, Prices({}, 4.5)),
        (0, Prices({}, 0.0)),
        ({"cuda": 4.5, "cpu": 0.05}, Prices({"cuda": 4.5, "cpu": 0.05})),
    ],
)
def test_prices_parse_a_number_or_a_mapping(value, expected):
    assert Prices.parse(value, "pipeline.yaml: cost") == expected


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("4.5", "pipeline.yaml: cost"),
        (True, "pipeline.yaml: cost"),
        ([4.5], "pipeline.yaml: cost"),
        (-1, "pipeline.yaml: cost"),
        (float("nan"), "pipeline.yaml: cost"),
        (float("inf"), "pipeline.yaml: cost"),
        ({"cuda": "4.5"}, "pipeline.yaml: cost.cuda"),
        ({"cuda": -0.5}, "pipeline.yaml: cost.cuda"),
        ({"gpu": 4.5}, "pipeline.yaml: cost: unknown device kind 'gpu'"),  # a typo would price nothing, silently
    ],
)
def test_bad_prices_are_refused_naming_where(value, where):
    with pytest.raises(InputError) as raised:
        Prices.parse(value, "pipeline.yaml: cost")
    assert str(raised.value).startswith(where) and "\n" not in str(raised.value)


def test_usage_sums_device_hours_by_kind_and_counts_unknown_stages():
    use = usage([compute("cuda", 2 * HOUR), compute("cuda", HOUR), compute("cpu", HOUR / 2), None, {}])
    assert use.device_hours == {"cuda": 3.0, "cpu": 0.5} and use.gpu_hours == 3.0 and use.unknown == 2
    assert use.cost is None  # no price given
    assert usage([compute("cuda", HOUR)], Prices({}, 4.5)).cost == 4.5
    assert usage([compute("cuda", 2 * HOUR), compute("cpu", HOUR)], Prices({"cuda": 4.0, "cpu": 0.5})).cost == 8.5
    assert usage([compute("cuda", 2 * HOUR), compute("cpu", HOUR)], Prices({"cpu": 0.5}, 4.0)).cost == 8.5
    assert usage([], Prices({}, 4.5)) == Usage({}, 0, 0.0)


def test_a_used_kind_without_a_price_counts_at_zero_and_is_named():
    use = usage([compute("cuda", HOUR), compute("cpu", HOUR)], Prices({"cuda": 4.5}))
    assert use.cost == 4.5 and use.unpriced == ("cpu",)
    assert describe_usage(use, "$") == "1.0000 GPU-h, 1.0000 CPU-h, cost $4.50 (CPU time not priced)"
    # a kind that took no time (a reuse record's) is not named
    assert usage([compute("cuda", HOUR), compute("cpu", 0.0)], Prices({"cuda": 4.5})).unpriced == ()


def test_describe_usage():
    use = usage([compute("cuda", HOUR / 4), compute("cpu", HOUR), None], Prices({}, 2.0))
    assert describe_usage(use, "$") == "0.2500 GPU-h, 1.0000 CPU-h, 1 stage(s) without a compute record, cost $2.50"
    assert describe_usage(usage([])) == "0.0000 GPU-h"


def test_a_committed_manifest_records_its_compute_and_a_reuse_record_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store = open_store(str(tmp_path / "store"))

    def produce(run):
        return Produced([run.put_bytes("out.txt", b"done")])

    first = execute_stage("snr_scan", StageContext(store, run_id="first", progress=False), {"p": 1}, [], produce)
    assert first.manifest.compute["device"] == "cpu" and first.manifest.compute["device_count"] == 1
    assert first.manifest.compute["device_seconds"] == first.manifest.compute["seconds"] == first.manifest.seconds
    assert load_manifest(store, "first", "snr_scan").compute == first.manifest.compute  # stored, not only returned

    again = execute_stage("snr_scan", StageContext(store, run_id="again", progress=False), {"p": 1}, [], produce)
    assert again.cached
    record = _load_own_manifest(store, "again", "snr_scan")
    assert record.reused_from == {"run_id": "first", "stage": "snr_scan"}
    assert record.compute == {**first.manifest.compute, "seconds": 0.0, "device_seconds": 0.0}

    record_reuse(store, first.manifest, "by-hand", "snr_scan")
    assert _load_own_manifest(store, "by-hand", "snr_scan").compute["device_seconds"] == 0.0
    assert usage([first.manifest.compute, record.compute]).device_hours["cpu"] == first.manifest.compute["device_seconds"] / HOUR


def test_a_step_run_inside_a_stage_is_counted_once(tmp_path, monkeypatch):
    """evaluate's drift scans and measurements record their own compute; evaluate's own leaves their time out."""
    import time

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store = open_store(str(tmp_path / "store"))
    context = StageContext(store, run_id="r", progress=False)

    def step(run):
        time.sleep(0.3)
        return [run.put_bytes("step.txt", b"step")]

    def stage(run):
        execute_stage("evaluate", context.as_step("measure"), {"inner": 1}, [], step)
        return [run.put_bytes("out.txt", b"done")]

    outer = execute_stage("evaluate", context, {"outer": 1}, [], stage).manifest
    inner = load_manifest(store, "r", "evaluate.measure")
    assert inner.compute["seconds"] >= 0.3 and outer.seconds >= inner.seconds  # wall time: the step ran inside
    assert outer.compute["seconds"] <= outer.seconds - inner.seconds + 0.05  # compute: the step's seconds left out
    assert outer.compute["seconds"] + inner.compute["seconds"] <= outer.seconds + 0.05


def test_a_manifest_written_before_compute_was_recorded_reads_as_unknown():
    document = json.loads(start_manifest("snr_scan", "1.0", "old", {}, []).finish([]).to_json())
    del document["compute"]
    old = Manifest.from_json(json.dumps(document).encode(), "old/manifest.json")
    assert old.compute is None and usage([old.compute]).unknown == 1


# --- the command line's --price-per-device-hour (spectrum_cli/prices.py) ------------------------------------------------


def parsed(*argv: str) -> Prices | None:
    parser = argparse.ArgumentParser()
    add_price_argument(parser)
    return prices_from_args(parser.parse_args(list(argv)))


def test_the_price_flag_takes_a_number_or_one_price_per_kind():
    assert parsed() is None
    assert parsed("--price-per-device-hour", "4.5") == Prices({}, 4.5)
    assert parsed("--price-per-device-hour", "cuda=4.5", "--price-per-device-hour", "cpu=0.05") == Prices({"cuda": 4.5, "cpu": 0.05})
    mixed = parsed("--price-per-device-hour", "cpu=0.05", "--price-per-device-hour", "3")
    assert mixed.of("cuda") == 3.0 and mixed.of("cpu") == 0.05


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["abc"], "--price-per-device-hour abc: a price per device-hour must be a number >= 0"),
        (["-1"], "--price-per-device-hour -1: a price per device-hour must be a number >= 0"),
        (["nan"], "--price-per-device-hour nan: a price per device-hour must be a number >= 0"),
        (["cuda="], "--price-per-device-hour cuda=: a price per device-hour must be a number >= 0"),
        (["gpu=4.5"], "--price-per-device-hour gpu=4.5: unknown device kind 'gpu'; use one of cuda, cpu"),
        (["1", "2"], "--price-per-device-hour 2: a price for every device kind was already given"),
        (["cuda=1", "cuda=2"], "--price-per-device-hour cuda=2: cuda was already given a price"),
    ],
)
def test_a_bad_price_flag_is_one_line_naming_it(values, message):
    with pytest.raises(InputError) as raised:
        parse_prices(values)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
