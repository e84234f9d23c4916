"""`spectrum select --policy budget --fit-gpu-memory SIZE`: the largest budget whose memory plan fits, recorded, and refused clearly.

The plan is the one cpt and sft check before they start: the selection chosen passes their pre-flight
check at the same setup with the same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as select_run
from stages.scan.table import read_table_metadata
from stages.selection.fit import SETUP_OPTIONS, MemoryFit, find_model_config
from stages.training.memory_plan import Setup

from .helpers import LLAMA_JSON, QUIET, REPO_ROOT, cli, local_store, scan, store_scan

SETUP = dict(gpus=2, seq_len=64, zero_stage=0)  # ZeRO-0: no preallocated bucket, so the trained set moves the plan


def fitted(table: Path, out: Path, memory: int | str, **options):
    """The SelectResult of fitting `memory` bytes per GPU at SETUP."""
    config = SelectConfig(snr_input=str(table), out_dir=str(out), policy="budget", fit_gpu_memory=str(memory), **{**SETUP, **options})
    return select_run(config, QUIET).detail


@pytest.fixture
def planner(tiny_snr_table):
    """The tiny model's planner at SETUP (the memory does not matter to `plan`)."""
    return MemoryFit(find_model_config(None, str(tiny_snr_table), None, None), Setup(bf16=True, **SETUP), 0, "0")


def between(planner, table: Path, share: float) -> int:
    """Bytes per GPU `share` of the way from the always-trained tensors' plan to that of every tensor."""
    always = planner.plan(["model.embed_tokens.weight", "lm_head.weight"]).total
    everything = planner.plan([r["tensor_name"] for r in pq.read_table(table).to_pylist()]).total
    return always + int((everything - always) * share)


def trained_by_next(result) -> list[str]:
    """The parameters one more step of the ranking would train: the next tensor and its module's bias."""
    rows = {r["tensor_name"]: r for r in result.table.to_pylist()}
    following = result.document.memory_fit["next_tensor"]
    bias = f"{following.removesuffix('.weight')}.bias"
    return [following, *([bias] if bias in rows else [])]


def test_more_memory_picks_a_larger_selection_the_chosen_plan_fits_and_one_more_step_would_not(tiny_snr_table, tmp_path, planner):
    chosen = []
    for index, memory in enumerate((between(planner, tiny_snr_table, 0.25), between(planner, tiny_snr_table, 0.75))):
        result = fitted(tiny_snr_table, tmp_path / str(index), memory)
        record = result.document.memory_fit
        planned = planner.plan(result.document.parameters).total
        assert planned == record["planned_bytes"]["total"] <= memory
        assert planner.plan([*result.document.parameters, *trained_by_next(result)]).total == record["next_planned_bytes"] > memory
        chosen.append(result.document.parameters)
    assert set(chosen[0]) < set(chosen[1])
    everything = between(planner, tiny_snr_table, 1.0)
    roomy = fitted(tiny_snr_table, tmp_path / "roomy", everything)
    assert roomy.document.memory_fit["next_tensor"] is None and roomy.document.memory_fit["planned_bytes"]["total"] <= everything


def test_the_ranking_is_kept_the_fit_is_recorded_and_its_budget_selects_the_same_again(tiny_snr_table, tmp_path, planner):
    memory = between(planner, tiny_snr_table, 0.5)
    result = fitted(tiny_snr_table, tmp_path / "fit", memory)
    rows = result.table.to_pylist()
    ranked = sorted((r for r in rows if r["rank"] is not None and not r["always_train"]), key=lambda r: r["rank"])
    picked = [r["picked_by_policy"] for r in ranked]
    assert any(picked) and not all(picked) and picked == sorted(picked, reverse=True)  # the top of the ranking, nothing skipped
    frozen = ranked[picked.index(False)]
    assert frozen["tensor_name"] == result.document.memory_fit["next_tensor"] and "more than" in frozen["reason"]

    on_disk = json.loads((tmp_path / "fit" / "selection.json").read_text())
    record = on_disk["memory_fit"]
    assert {"gpu_memory": str(memory), "gpu_memory_bytes": memory, "gpus": 2, "seq_len": 64, "zero_stage": 0}.items() <= record.items()
    assert record["micro_batch_size"] == 1 and record["gradient_checkpointing"] is False and record["bf16"] is True
    assert record["model_config"]["uri"].endswith("/config.json") and len(record["model_config"]["sha256"]) == 64
    metadata = read_table_metadata(pq.read_table(tmp_path / "fit" / "selection.parquet"))
    assert json.loads(metadata["memory_fit"]) == record

    # the budget it came to, recorded as the policy's budget_percent, selects exactly the same (what sft --rescan reselects with)
    assert on_disk["policy"] == "budget" and on_disk["budget_percent"] == rows[0]["budget_percent"]
    percent = on_disk["budget_percent"]
    again = SelectConfig(snr_input=str(tiny_snr_table), out_dir=str(tmp_path / "again"), policy="budget", budget_percent=percent)
    assert select_run(again, QUIET).detail.document.parameters == result.document.parameters
    assert "memory_fit" not in json.loads((tmp_path / "again" / "selection.json").read_text())


def test_the_chosen_selection_passes_cpt_s_pre_flight_check_with_the_same_plan(tiny_model, tiny_snr_table, tmp_path, planner, monkeypatch):
    """One estimate: cpt's check (stages.training.runner._check_fit) on a GPU plans the bytes select recorded."""
    import torch

    from stages.training import loop, runner
    from stages.training.selection import load_selection

    result = fitted(tiny_snr_table, tmp_path / "fit", between(planner, tiny_snr_table, 0.5))
    checked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", str(SETUP["gpus"]))
    monkeypatch.setattr(loop, "require_fits", lambda needed, where: checked.append(needed))  # imported by _check_fit when it runs
    config = runner.TrainingConfig(model=str(tiny_model), data="d", seq_len=64, zero_stage=0, precision="bf16")
    selection = load_selection(str(tmp_path / "fit" / "selection.json"), None, None)
    runner._check_fit(tiny_model, selection, config, runner._settings(config), tokens=1)
    assert checked == [result.document.memory_fit["planned_bytes"]["total"]]


def test_from_a_store_run_the_config_is_the_one_the_scan_read_and_it_is_an_input(tiny_model, tmp_path):
    from stages.download import STAGE as DOWNLOAD
    from stages.download import DownloadConfig

    store = local_store(tmp_path)
    downloaded = DOWNLOAD.run(DownloadConfig(model=str(tiny_model)), StageContext(store, progress=False))
    stored_model = DOWNLOAD.output("model", store, downloaded.manifest)
    scanned, _ = store_scan(store, stored_model, tmp_path / "work")
    config_ref = next(r for r in scanned.manifest.inputs if r["uri"].endswith("/config.json"))
    config = SelectConfig(snr_run=scanned.manifest.run_id, policy="budget", fit_gpu_memory="1GiB", **SETUP)
    first = select_run(config, StageContext(store, progress=False))
    assert first.manifest.inputs[1] == {k: config_ref[k] for k in ("uri", "sha256", "size")}
    assert first.detail.document.memory_fit["model_config"]["sha256"] == config_ref["sha256"]
    assert "GiB per GPU of the 1GiB it was fitted to" in first.message
    assert first.manifest.parameters["fit_gpu_memory"] == 2**30 and first.manifest.parameters["gpus"] == 2  # bytes: any spelling of 1GiB
    assert select_run(config, StageContext(store, progress=False)).cached
    other = SelectConfig(snr_run=scanned.manifest.run_id, policy="budget", fit_gpu_memory="1GiB", **{**SETUP, "gpus": 4})
    assert not select_run(other, StageContext(store, progress=False)).cached  # the setup is part of the cache key
    by_model = SelectConfig(snr_run=scanned.manifest.run_id, policy="budget", fit_gpu_memory="1GiB", model=stored_model, **SETUP)
    assert select_run(by_model, StageContext(store, progress=False)).detail.document.parameters == first.detail.document.parameters


def test_a_selection_without_a_memory_fit_keeps_its_cache_key():
    plain = SelectConfig(snr_input="snr.parquet", policy="budget", budget_percent=30.0, top_percent=None)
    assert not {"fit_gpu_memory", *SETUP_OPTIONS} & set(plain.cache_parameters())


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fit-gpu-memory", "1GiB"], "needs --policy budget, not per-type"),
        (["--policy", "budget", "--fit-gpu-memory", "1GiB", "--budget-percent", "20"], "either --budget-percent or --fit-gpu-memory"),
        (["--policy", "budget"], "needs --budget-percent .* or --fit-gpu-memory SIZE"),
        (["--policy", "budget", "--fit-gpu-memory", "80 parsecs"], "--fit-gpu-memory '80 parsecs' is not a size"),
        (["--policy", "budget", "--fit-gpu-memory", "1GiB", "--gpus", "0"], "--gpus must be at least 1"),
        (["--policy", "budget", "--fit-gpu-memory", "1GiB", "--zero-stage", "5"], "unknown --zero-stage 5"),
        (["--policy", "budget", "--budget-percent", "20", "--model", "m"], "--model names the model --fit-gpu-memory plans"),
        (
            ["--policy", "budget", "--fit-gpu-memory", "1KiB"],
            "nothing fits --fit-gpu-memory 1KiB: training the always-trained tensors alone",
        ),
        (
            ["--policy", "budget", "--fit-gpu-memory", "1KiB", "--no-always-train"],
            r"nothing fits --fit-gpu-memory 1KiB: training only the top-ranked tensor \(.*\) needs",
        ),
        (["--policy", "budget", "--fit-gpu-memory", "1GiB", "--model", "NOWHERE"], "--model .*nowhere does not exist"),
    ],
)
def test_bad_requests_are_one_clear_error(tiny_snr_table, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "-o", str(tmp_path / "sel"), *argv)
    assert code == 2 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "sel").exists()


def test_nothing_fits_names_the_smallest_plan_and_a_setup_that_would_fit(tiny_snr_table, tmp_path):
    with pytest.raises(InputError, match=r"alone needs \d+\.\d\d GiB per GPU on 1 GPU\(s\) at ZeRO-2.*; ZeRO-0, .* would fit that"):
        select_run(SelectConfig(snr_input=str(tiny_snr_table), out_dir=str(tmp_path / "s"), policy="budget", fit_gpu_memory="100MB"), QUIET)


def test_a_table_whose_model_is_gone_needs_model_and_another_model_is_refused(synthetic_model, tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    scan(copy, tmp_path / "snr.parquet")
    (copy / "config.json").unlink()
    with pytest.raises(InputError, match=r"cannot find the config.json of the model .*; pass --model MODEL"):
        fitted(tmp_path / "snr.parquet", tmp_path / "a", "1GiB")
    assert fitted(tmp_path / "snr.parquet", tmp_path / "b", "1GiB", model=str(tiny_model)).document.memory_fit is not None
    wider = synthetic_model(hidden_size=96)
    with pytest.raises(InputError, match=r"config .* does not describe the scanned model: its tensors have other shapes"):
        fitted(tmp_path / "snr.parquet", tmp_path / "c", "1GiB", model=str(wider / "config.json"))
    deeper = synthetic_model(num_hidden_layers=1)
    with pytest.raises(InputError, match=r"does not describe the scanned model: it has no model\.layers\.1\."):
        fitted(tmp_path / "snr.parquet", tmp_path / "d", "1GiB", model=str(deeper))


def test_a_store_scan_whose_local_config_changed_is_refused(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    store = local_store(tmp_path)
    scanned, _ = store_scan(store, copy, tmp_path / "work")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    config = SelectConfig(snr_run=scanned.manifest.run_id, policy="budget", fit_gpu_memory="1GiB")
    with pytest.raises(InputError, match=r"the config.json the scan of run .* read, is gone or changed since; pass --model"):
        select_run(config, StageContext(store, progress=False))


def test_a_reference_json_has_no_parameter_counts_to_fit(tmp_path):
    config = SelectConfig(snr_input=str(LLAMA_JSON), out_dir=str(tmp_path / "s"), policy="budget", fit_gpu_memory="80GiB")
    with pytest.raises(InputError, match="the budget policy needs parameter counts"):
        select_run(config, QUIET)


# --- the options ---------------------------------------------------------------------------------------


def test_plan_and_select_share_the_planning_options_and_select_help_stays_light():
    import argparse

    from spectrum_cli import plan_command

    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    plan = {action.dest: action for action in parser._actions}
    fields = SelectConfig.__dataclass_fields__
    for name, spec in SETUP_OPTIONS.items():
        assert plan[name].default == fields[name].default == spec.default
        assert plan[name].help in fields[name].metadata["spectrum_option"].help
    probe = "import sys\nfrom spectrum_cli.main import main\ntry:\n    main(['select', '--help'])\nexcept SystemExit:\n    pass\n"
    probe += "print(' '.join(m for m in ('transformers', 'stages.training.memory_plan', 'stages.selection.fit') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "--fit-gpu-memory" in done.stdout and "--gpus" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "stages.selection.fit"  # the option definitions, not the planner
