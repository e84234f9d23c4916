"""The pipeline's own lease, config paths relative to the config, and checks that run before Prefect (no training, no server)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flows import pipeline
from flows.pipeline import PIPELINE_LEASE, run_pipeline
from flows.pipeline_config import load_pipeline_config
from stages.base.errors import InputError
from stages.store import open_store
from stages.store.lease import LeaseHeldError, acquire_lease, lease_state
from stages.store.manifest import lease_folder

from .helpers import REPO_ROOT, child_env


def config_in(folder, **document):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump({"model": "m", "data": "d", "store": "store", "report": False, **document}))
    return folder / "pipeline.yaml"


@pytest.mark.parametrize(
    ("body", "outcome", "error"),
    [
        (lambda *a: None, "succeeded", None),
        (InputError("bad drop"), "failed", InputError),
        (KeyboardInterrupt(), "interrupted", KeyboardInterrupt),
    ],
)
def test_a_pipeline_holds_its_run_lease_and_releases_it_with_its_outcome(tmp_path, monkeypatch, body, outcome, error):
    def stages(*args):
        assert lease_state(store, lease_folder("r1", PIPELINE_LEASE)).live  # held while the stages run
        if isinstance(body, BaseException):
            raise body

    monkeypatch.setattr(pipeline, "_run_stages", stages)
    config = load_pipeline_config(config_in(tmp_path))
    store = open_store(str(tmp_path / "store"))
    if error is None:
        assert run_pipeline(config, run="r1").run_id == "r1"
    else:
        with pytest.raises(error):
            run_pipeline(config, run="r1")
    released = lease_state(store, lease_folder("r1", PIPELINE_LEASE)).released
    assert released["outcome"] == outcome and ("bad drop" in released["reason"] if outcome == "failed" else True)


def test_a_second_pipeline_with_a_live_run_id_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run_stages", lambda *a: pytest.fail("a second pipeline ran stages"))
    config = load_pipeline_config(config_in(tmp_path))
    store = open_store(str(tmp_path / "store"))
    acquire_lease(store, lease_folder("nightly", PIPELINE_LEASE), {"pid": 1, "run_id": "nightly"}, timeout=600)
    with pytest.raises(LeaseHeldError, match="run 'nightly' is being run by another pipeline") as caught:
        run_pipeline(config, run="nightly")
    assert caught.value.exit_code == 4


def test_relative_paths_in_a_config_are_relative_to_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "models" / "base").mkdir(parents=True)
    config = load_pipeline_config(
        config_in(
            folder,
            model="models/base",
            data="drops/2026-11",
            stages={"sft": {"data": "chats", "chat_template": "t.jinja"}, "evaluate": {"general": "../wiki.txt"}},
        )
    )
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    assert config.model == str(folder / "models" / "base") and config.data == str(folder / "drops" / "2026-11")
    assert config.store == str(folder / "store")
    assert config.options["sft"] == {"data": str(folder / "chats"), "chat_template": str(folder / "t.jinja")}
    assert config.options["evaluate"]["general"] == str(tmp_path / "wiki.txt")
    kept = load_pipeline_config(
        config_in(tmp_path / "b", model="HuggingFaceTB/SmolLM2-135M", data="store:data/sha256-ab", store="s3://bucket/p")
    )
    assert (kept.model, kept.data, kept.store) == ("HuggingFaceTB/SmolLM2-135M", "store:data/sha256-ab", "s3://bucket/p")
    with pytest.raises(InputError, match=r"pipeline.yaml: store: unsupported URI scheme 's4'"):
        load_pipeline_config(config_in(tmp_path / "c", store="s4:/x"))


BAD_CONFIGS = {
    "unknown stage": {"stages": {"finetune": {}}},
    "bad option": {"stages": {"cpt": {"max_steps": "many"}}},
    "bad default check": {"stages": {"layer_select": {"top_percent": 150}}},
}


@pytest.mark.integration
@pytest.mark.parametrize("change", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_pipeline_config_is_one_error_line_before_prefect_is_imported(tmp_path, change):
    config = config_in(tmp_path, **change)
    probe = (
        "import sys; from spectrum_cli.main import main; code = main(['pipeline', 'run', sys.argv[1]]); "
        "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported'); sys.exit(code)"
    )
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, "-c", probe, str(config)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stdout.strip() == "prefect not imported", done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "prefect").exists()  # no database, no temporary server


@pytest.mark.integration
def test_rerun_options_are_checked_before_prefect_starts(tmp_path):
    config = config_in(tmp_path)
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "spectrum_cli.main", "pipeline", "run", str(config), "--only", "evaluate"]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr == "error: --only re-runs a stage of a committed run: name it with --run RUN\n"
    assert not (tmp_path / "prefect").exists() and os.listdir(tmp_path) == ["pipeline.yaml"]
