"""The `spectrum` command line and the stage entrypoints: help, exit codes, one-line errors, end to end."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spectrum_cli.main import main

from .helpers import LLAMA_JSON, LLAMA_YAML_50, REPO_ROOT, venv_bin


def run_command(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- help ---------------------------------------------------------------------------------------


def test_spectrum_help_lists_the_subcommands():
    done = run_command(venv_bin("spectrum"), "--help")
    assert done.returncode == 0, done.stderr
    for command in ("download", "scan", "select", "cpt", "sft", "evaluate", "compare", "report", "pipeline", "runs", "audit", "demo"):
        assert command in done.stdout


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "scan",
            ["--out", "--estimator", "--svd-method", "--device", "--include", "--exclude", "--reference-json", "--workers", "--overwrite"],
        ),
        ("select", ["--out-dir", "--policy", "--top-percent", "--budget-percent", "--include-type", "--always-train", "--no-always-train"]),
        ("cpt", ["--data", "--selection", "--selection-run", "--full", "--max-steps", "--seq-len", "--zero-stage", "--save-steps"]),
        ("demo", ["--workdir", "--top-percent", "--layers", "--real", "--overwrite"]),
        ("evaluate", ["--cpt-run", "--sft-run", "--base-model", "--general", "--max-tokens", "--task", "--tasks-dir", "--no-snr-drift"]),
        ("compare", ["--data", "--method", "--max-steps", "--lora-rank", "--eval-max-tokens", "--record"]),
        ("report", ["--out", "--overwrite", "--store"]),
        ("sft", ["--chat-template", "--rescan", "--selection-run"]),
    ],
)
def test_subcommand_help(capsys, command, options):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spectrum {command}")
    for option in options:
        assert option in out


def test_pipeline_run_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["pipeline", "run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: spectrum pipeline run") and all(o in out for o in ("--only", "--from", "--force", "--run"))


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("spectrum ")


@pytest.mark.parametrize(
    ("module", "option"),
    [
        ("stages.download", "--model"),
        ("stages.snr_scan", "--svd-method"),
        ("stages.layer_select", "--policy"),
        ("stages.cpt", "--zero-stage"),
    ],
)
def test_stage_module_help(module, option):
    done = run_command(sys.executable, "-m", module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}")
    assert option in done.stdout


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# --- errors are one line and a non-zero exit -------------------------------------------------------


def test_scan_of_a_missing_folder_fails_with_one_line(tmp_path):
    missing = tmp_path / "no-model"
    out = tmp_path / "snr.parquet"
    done = run_command(venv_bin("spectrum"), "scan", str(missing), "--out", str(out))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_scan_of_a_corrupt_shard_exits_3(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = cli(capsys, "scan", str(folder), "--out", str(tmp_path / "snr.parquet"))
    assert code == 3
    assert err.startswith("error: ") and "model.safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "snr.parquet").exists()


def test_scan_refuses_an_existing_output_with_exit_4(tiny_model, tmp_path, capsys):
    out = tmp_path / "snr.parquet"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "scan", str(tiny_model), "--out", str(out))
    assert code == 4 and "--overwrite" in err
    assert out.read_bytes() == b"keep me"


def test_scan_with_zero_workers_exits_2(tiny_model, tmp_path, capsys):
    code, _, err = cli(capsys, "scan", str(tiny_model), "--out", str(tmp_path / "snr.parquet"), "--workers", "0")
    assert code == 2 and err.startswith("error: ") and "--workers" in err
    assert not (tmp_path / "snr.parquet").exists()


def test_select_with_contradicting_always_train_options(tiny_snr_table, tmp_path, capsys):
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "-o", str(tmp_path / "sel"), "--always-train", "lm_head", "--no-always-train")
    assert code == 2 and err.startswith("error: ") and "contradict" in err
    assert not (tmp_path / "sel").exists()


def test_select_with_a_bad_percentage(tiny_snr_table, tmp_path, capsys):
    code, _, err = cli(capsys, "select", str(tiny_snr_table), "-o", str(tmp_path / "sel"), "--top-percent", "0")
    assert code == 2 and "--top-percent must be in (0, 100]" in err


# --- end to end -----------------------------------------------------------------------------------


def test_scan_then_select_in_process(tiny_model, tmp_path, capsys):
    table = tmp_path / "snr.parquet"
    ref = tmp_path / "snr_results.json"
    options = ["--model-id", "tiny", "--estimator", "gavish-donoho", "--exclude", "lm_head", "--reference-json", str(ref), "--no-progress"]
    code, out, err = cli(capsys, "scan", str(tiny_model), "--out", str(table), *options)
    assert code == 0, err
    assert out.startswith("scanned 15 matrices (6 tensors not scanned)")
    rows = pq.read_table(table).to_pylist()
    assert {r["estimator"] for r in rows if r["scanned"]} == {"gavish-donoho"}
    assert len(json.loads(ref.read_text())) == 15

    code, out, err = cli(capsys, "select", str(table), "-o", str(tmp_path / "sel"), "--policy", "global", "--top-percent", "40")
    assert code == 0, err
    summary = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert summary["policy"] == "global" and summary["model_id"] == "tiny"
    assert out.startswith(f"selected {len(summary['trainable_tensors'])} tensors")


def test_select_end_to_end_reproduces_the_reference_yaml(tmp_path):
    out_dir = tmp_path / "sel"
    done = run_command(venv_bin("spectrum"), "select", str(LLAMA_JSON), "--out-dir", str(out_dir), "--top-percent", "50")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"selected 146 tensors -> {out_dir}"
    assert (out_dir / "unfrozen_parameters.yaml").read_bytes() == LLAMA_YAML_50.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["selection.json", "selection.parquet", "unfrozen_parameters.yaml"]
    assert pq.read_table(out_dir / "selection.parquet").num_rows == 291


@pytest.mark.integration
def test_demo_runs_the_whole_pipeline_with_its_report_and_again_reuses_everything(tmp_path, capsys, monkeypatch):
    from stages.store import list_runs, load_manifest, open_store
    from stages.store.lineage import audit_run

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    workdir = tmp_path / "demo"
    code, out, err = cli(capsys, "demo", "--workdir", str(workdir), "--layers", "2")
    assert code == 0, err
    report = workdir / "report.html"
    assert f"report: {report}" in out and report.is_file() and (workdir / "report.md").is_file()
    run_id = out.split("pipeline run ")[1].split()[0].rstrip(";")
    store = open_store(str(workdir / "store"))
    stages = list_runs(store)[run_id]
    assert {"download", "snr_scan", "layer_select", "cpt", "sft", "evaluate", "evaluate.sft"} <= set(stages)
    assert audit_run(store, run_id)["training"]["changed"]
    evaluation = json.loads(store.get_bytes(f"runs/{run_id}/evaluate/evaluation.json"))
    heldout = next(m for m in evaluation["metrics"] if m["metric"] == "perplexity" and m["dataset"] == "heldout")
    assert heldout["trained"] < heldout["base"]
    assert not any(p.name.endswith((".partial", ".tmp")) for p in workdir.rglob("*"))

    # again: every stage is reused, recorded under the new run
    code, out, err = cli(capsys, "demo", "--workdir", str(workdir), "--layers", "2")
    assert code == 0, err
    assert "(6 of 6 stages reused)" in out
    again = out.split("pipeline run ")[1].split()[0].rstrip(";")
    assert again != run_id and load_manifest(store, again, "cpt").run_id == run_id


def test_the_command_line_of_a_config_parses_back_to_the_same_config_and_context(tmp_path):
    """What a container or a subprocess runs is exactly what the orchestrator configured."""
    import argparse

    from stages import cpt, evaluate, layer_select
    from stages.core.cli import command_line, config_from_args, context_from_args, stage_parser
    from stages.core.stage import StageContext
    from stages.store import open_store

    store = open_store(str(tmp_path / "store"))
    context = StageContext(store, run_id="r-1", force=True, work_dir=tmp_path / "work", progress=False, step="sft")
    configs = [
        (cpt.STAGE, cpt.CptConfig(model="m", data="d", selection_run="r/layer_select.sft", learning_rate=3e-4, seed=3)),
        (layer_select.STAGE, layer_select.SelectConfig(snr_run="r", top_percent=25.0, depth_aware=True, include_types=["mlp", "attn"])),
        (layer_select.STAGE, layer_select.SelectConfig(snr_input="snr.parquet", always_train=[])),
        (evaluate.STAGE, evaluate.EvaluateConfig(cpt_run="r", snr_drift=False, max_tokens=100)),
    ]
    for stage, config in configs:
        argv = command_line(stage, config, context, record=tmp_path / "m.json")
        args = stage_parser(stage, argparse.ArgumentParser()).parse_args(argv)
        assert config_from_args(stage.config, args) == config, argv
        parsed = context_from_args(args)
        assert (parsed.store.root_uri, parsed.run_id, parsed.force, parsed.work_dir, parsed.progress, parsed.step) == (
            store.root_uri, "r-1", True, tmp_path / "work", False, "sft",
        )  # fmt: skip
        assert args.record == str(tmp_path / "m.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["scan", "m", "--out", "x.parquet", "--step", "sft"], "--step apply to runs in an artifact store"),
        (["scan", "m", "--store", "STORE", "--step", "a.b"], "invalid step qualifier 'a.b'"),
        (
            ["watch", "pipeline.yaml", "--prefix", "incoming", "--once", "--interval", "0"],
            "--interval and --claim-timeout must be positive",
        ),
    ],
)
def test_bad_orchestration_options_are_clear_errors(capsys, tmp_path, argv, message):
    argv = [str(tmp_path / "store") if a == "STORE" else a for a in argv]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and message in err and not (tmp_path / "store" / "runs").exists()


def test_a_stage_flow_names_a_stage_and_its_options(tmp_path):
    from flows.stage_flow import stage_flow
    from stages.base.errors import InputError

    for stage, options, message in (("train", {}, "unknown stage 'train'"), ("snr_scan", {"modeldir": "m"}, "options of snr_scan:")):
        with pytest.raises(InputError, match=message):
            stage_flow.fn(stage, options, str(tmp_path / "store"))


_LOADED = """
import sys
from spectrum_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize(
    ("argv", "not_loaded"),
    [
        (["--version"], ("torch", "prefect", "deepspeed", "stages.store", "stages.core", "pyarrow", "pandas")),
        (["--help"], ("torch", "prefect", "deepspeed", "stages.store", "stages.core", "pyarrow", "pandas")),
        (["scan", "--help"], ("torch", "transformers", "prefect", "deepspeed", "stages.training", "stages.cpt", "mlflow", "matplotlib")),
        (["runs", "--help"], ("torch", "prefect", "deepspeed", "mlflow")),
    ],
)
def test_a_command_imports_only_what_it_uses(argv, not_loaded):
    """`spectrum --version` must answer at once: no stage, framework or orchestrator is imported for it."""
    done = subprocess.run([sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.strip().splitlines()[-1].split())
    assert not [name for name in not_loaded if name in loaded]


_DEEPSPEED_THEN_MLFLOW = """
import sys
from stages.base.library_output import import_deepspeed
import_deepspeed()
print("mlflow" in sys.modules, "fastapi" in sys.modules)
import mlflow
print(mlflow.MlflowClient.__name__)
"""


def test_training_imports_deepspeed_without_mlflow_and_tracking_still_can():
    """DeepSpeed imports mlflow (for its autotuner) whenever installed: a training process need not pay for it."""
    done = subprocess.run([sys.executable, "-c", _DEEPSPEED_THEN_MLFLOW], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "MlflowClient"]


_PIPELINE_IMPORTS = """
import sys
import flows.pipeline
from stages.base.environment import cuda_available
print(cuda_available(), " ".join(sorted(m for m in ("torch", "transformers", "deepspeed", "matplotlib") if m in sys.modules)))
"""


def test_the_pipeline_imports_no_training_library_until_a_stage_trains():
    """A pipeline whose stages are all reused (a demo run again) reads settings and plans without torch or DeepSpeed."""
    done = subprocess.run([sys.executable, "-c", _PIPELINE_IMPORTS], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    from stages.base.environment import GPU_DRIVER_PATHS

    if not any(Path(p).exists() for p in GPU_DRIVER_PATHS):  # no GPU driver: known without torch
        assert done.stdout.split() == ["False"]


@pytest.mark.parametrize("driver", ["/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd"])  # NVIDIA, WSL2, AMD (ROCm)
def test_cuda_available_asks_torch_where_a_driver_is_loaded(monkeypatch, driver):
    import torch

    from stages.base import environment

    real_exists = environment.os.path.exists
    monkeypatch.setattr(environment.os.path, "exists", lambda path: path == driver or real_exists(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert environment.cuda_available()


def test_every_command_builds_and_each_stage_command_is_its_stage_s():
    from spectrum_cli.main import COMMANDS, build_parser

    build_parser([], every_command=True)  # every module's options, as argparse takes them
    for command in COMMANDS:
        if command.is_stage:
            assert importlib.import_module(command.module).STAGE.command == command.name
