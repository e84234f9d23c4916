"""The pipeline declared once: every wired option names an output its upstream stage has, and the steps follow from it."""

from __future__ import annotations

import typing

import pytest

from flows.pipeline_config import parse_pipeline_config
from flows.pipeline_definition import PIPELINE, STAGE_BY_NAME, settable_options, steps_of
from stages.core.stage import PIPELINE_INPUTS, RUN_OUTPUT, is_stage_ref, options_of, wires_of
from stages.store import StageRef


def test_every_wired_option_takes_an_output_its_upstream_stage_declares():
    for step in PIPELINE:
        hints = typing.get_type_hints(step.stage.config)
        for name, wire in wires_of(step.stage.config).items():
            if wire.stage == PIPELINE_INPUTS:
                assert wire.output in ("model", "revision", "data")
                continue
            assert wire.stage in STAGE_BY_NAME, f"{step.name}.{name} takes {wire} of no stage"
            outputs = {RUN_OUTPUT, *STAGE_BY_NAME[wire.stage].outputs}
            assert wire.output in outputs, f"{step.name}.{name} takes {wire}, not an output of {wire.stage}"
            assert is_stage_ref(hints[name]) == (wire.output == RUN_OUTPUT), f"{step.name}.{name}: a run is a StageRef"


def test_the_steps_follow_from_the_declarations():
    assert [s.name for s in steps_of(set())] == ["download", "snr_scan", "layer_select", "cpt", "evaluate"]
    assert [s.name for s in steps_of({"sft"})] == ["download", "snr_scan", "layer_select", "cpt", "sft", "evaluate.sft", "evaluate"]
    upstream = {s.name: s.upstream for s in steps_of({"sft"})}
    assert upstream == {
        "download": [],
        "snr_scan": ["download"],
        "layer_select": ["snr_scan"],
        "cpt": ["download", "layer_select"],
        "sft": ["layer_select", "cpt"],
        "evaluate.sft": ["sft"],
        "evaluate": ["cpt"],
    }
    assert {s.name: s.group for s in steps_of({"sft"})}["evaluate.sft"] == "sft"  # --only sft evaluates its model too


def test_a_pipeline_config_may_set_neither_wired_nor_local_file_options(tmp_path):
    for stage in STAGE_BY_NAME.values():
        wired = set(wires_of(stage.config))
        local = {f.name for f, spec in options_of(stage.config) if not spec.pipeline}
        assert not (wired | local) & set(settable_options(stage))
    with pytest.raises(Exception, match=r"stages.evaluate.out_dir: an option for local files"):
        parse_pipeline_config({"model": "m", "data": "d", "stages": {"evaluate": {"out_dir": "x"}}}, tmp_path / "p.yaml")
    with pytest.raises(Exception, match=r"stages.layer_select.snr_run: set by the pipeline from the stage before \(snr_scan.run\)"):
        parse_pipeline_config({"model": "m", "data": "d", "stages": {"layer_select": {"snr_run": "r"}}}, tmp_path / "p.yaml")


def test_an_upstream_run_given_as_text_becomes_a_checked_stage_ref():
    from stages.base.errors import InputError
    from stages.evaluate import EvaluateConfig
    from stages.layer_select import SelectConfig

    assert SelectConfig(snr_run="r1").snr_run == StageRef("r1", "snr_scan")
    assert SelectConfig(snr_run="r1/snr_scan.sft").snr_run == StageRef("r1", "snr_scan.sft")
    assert str(StageRef("r1", "snr_scan")) == "r1" and str(StageRef("r1", "snr_scan.sft")) == "r1/snr_scan.sft"
    assert EvaluateConfig(cpt_run="r2").plain_options()["cpt_run"] == "r2"
    with pytest.raises(InputError, match=r"--snr-run 'r1/cpt' names a cpt step; pass RUN or RUN/snr_scan.QUALIFIER"):
        SelectConfig(snr_run="r1/cpt")
    with pytest.raises(InputError, match=r"invalid run id in --cpt-run"):
        EvaluateConfig(cpt_run="../x")


def test_a_memory_fit_plans_at_the_setup_cpt_trains_with(tmp_path):
    def parsed(stages: dict):
        return parse_pipeline_config({"model": "m", "data": "d", "stages": stages}, tmp_path / "p.yaml").options["layer_select"]

    fit = {"policy": "budget", "fit_gpu_memory": "80GiB", "gpus": 8}
    select = parsed({"layer_select": dict(fit), "cpt": {"seq_len": 4096, "gradient_checkpointing": True}})
    assert (select["seq_len"], select["gradient_checkpointing"], select["micro_batch_size"], select["zero_stage"]) == (4096, True, 1, 2)
    assert select["gpus"] == 8  # the launcher's, not cpt's
    assert parsed({"layer_select": {**fit, "seq_len": 4096}, "cpt": {"seq_len": 4096}})["seq_len"] == 4096  # the same twice is fine
    with pytest.raises(Exception, match=r"stages.layer_select.seq_len: 2048, but cpt trains with seq_len 4096; .* state seq_len once"):
        parsed({"layer_select": {**fit, "seq_len": 2048}, "cpt": {"seq_len": 4096}})
    assert "seq_len" not in parsed({"layer_select": {"policy": "budget", "budget_percent": 30}, "cpt": {"seq_len": 4096}})  # no fit
