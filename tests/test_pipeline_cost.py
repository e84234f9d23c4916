"""A pipeline run's device time and cost: its own stages count, reused ones cost nothing; the CLI prints the total."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from flows.integration_settings import CostSettings
from flows.notify import describe_run_usage, run_usage
from stages.store.compute import Prices


def compute(device: str, device_seconds: float) -> dict:
    return {"device": device, "device_name": None, "device_count": 1, "seconds": device_seconds, "device_seconds": device_seconds}


def test_a_run_counts_the_device_time_of_its_own_stages_and_none_of_the_ones_it_reused():
    manifests = {
        "download": SimpleNamespace(run_id="r2", compute=compute("cpu", 3600)),  # reused: run r1 did (and counted) the work
        "cpt": SimpleNamespace(run_id="r3", compute=compute("cuda", 7200)),
        "evaluate": SimpleNamespace(run_id="r3", compute=compute("cpu", 1800)),
    }
    use = run_usage("r3", manifests, CostSettings(Prices({"cuda": 4.0, "cpu": 0.1}), "$"))
    assert use.device_hours == {"cpu": 0.5, "cuda": 2.0} and use.gpu_hours == 2.0 and use.cost == pytest.approx(8.05)
    assert describe_run_usage("r3", manifests, CostSettings(Prices({}, 1.0), "EUR ")) == "2.0000 GPU-h, 0.5000 CPU-h, cost EUR 2.50"
    assert describe_run_usage("r3", manifests, None) == "2.0000 GPU-h, 0.5000 CPU-h"


def test_the_pipeline_command_prints_the_runs_compute(monkeypatch, tmp_path):
    import flows.pipeline
    from spectrum_cli import pipeline_command

    (tmp_path / "pipeline.yaml").write_text("model: m\ndata: d\nstore: store\n")
    outcome = {"lines": [], "run_id": "r3", "stages": {"cpt": "r3"}, "ran": ["cpt"], "cached": [], "report": None}
    monkeypatch.setattr(pipeline_command, "start_prefect", lambda: None)
    monkeypatch.setattr(flows.pipeline, "pipeline_flow", lambda *a, **k: {**outcome, "compute": "2.0000 GPU-h, cost $8.05"})
    args = argparse.Namespace(config=str(tmp_path / "pipeline.yaml"), only=None, from_stage=None, force=[], run=None)
    assert pipeline_command.run_command(args).splitlines() == ["pipeline run r3:", "  cpt: ran", "compute: 2.0000 GPU-h, cost $8.05"]
