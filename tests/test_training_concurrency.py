"""Real processes: two identical runs on one machine at once, and a run killed with SIGKILL before its commit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import cpt
from stages.base.contracts import CPT
from stages.store import list_runs, load_manifest, open_store

from .helpers import REPO_ROOT
from .test_cpt import base_model, config, context, corpus, drop, selection, sha  # noqa: F401  (fixtures)

DEADLINE = 900  # seconds: a hang guard sized for a loaded machine and DeepSpeed's first op build


# `python -m stages.cpt`, except that the process stops itself (SIGSTOP) once it has published its first checkpoint,
# so the test acts on a run that is certainly mid-training.
STOPS_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from stages import cpt
from stages.core.cli import stage_main
from stages.training import runner

publish = runner.publish_checkpoint
stopped = []

def publish_then_stop(stage, folder, step):
    infos = publish(stage, folder, step)
    if not stopped:
        stopped.append(step)
        os.kill(os.getpid(), signal.SIGSTOP)
    return infos

runner.publish_checkpoint = publish_then_stop
sys.exit(stage_main(cpt.STAGE, sys.argv[1:]))
"""


def start(
    base_model: Path, drop: Path, selection: Path, tmp_path: Path, run_id: str, work: str, *extra: str, stops: bool = False  # noqa: F811
) -> subprocess.Popen:
    program = ["-c", STOPS_AFTER_FIRST_CHECKPOINT] if stops else ["-m", "stages.cpt"]
    command = [sys.executable, *program, str(base_model), "--data", str(drop), "--selection", str(selection)]
    command += ["--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / work), "--run-id", run_id, "--seq-len", "64"]
    command += ["--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--learning-rate", "2e-3", "--warmup-steps", "1"]
    command += ["--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # this test process's rendezvous
        env.pop(name, None)
    log = open(tmp_path / f"{run_id}.log", "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if process.poll() is not None and not condition():
            pytest.fail(f"the process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {DEADLINE} s")
        time.sleep(0.2)


def checkpoint_published(tmp_path: Path, run_id: str, step: int):
    return lambda: (tmp_path / "store" / "runs" / run_id / CPT / "checkpoints" / f"step-{step}" / "complete.json").is_file()


@pytest.mark.integration
def test_a_second_identical_run_waits_for_the_first_and_reuses_it(base_model, drop, selection, tmp_path):  # noqa: F811
    options = ("--max-steps", "6", "--save-steps", "2")
    first = start(base_model, drop, selection, tmp_path, "first", "work", *options, stops=True)
    wait_for(checkpoint_published(tmp_path, "first", 2), first, "the first checkpoint")  # then it stops, holding the work folder
    try:
        second = start(base_model, drop, selection, tmp_path, "second", "work", *options)
        wait_for(lambda: "waiting for it to finish" in (tmp_path / "second.log").read_text(), second, "the second run waiting")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(DEADLINE) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.wait(DEADLINE) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "reusing run first" in (tmp_path / "second.log").read_text()
    store = open_store(str(tmp_path / "store"))
    assert load_manifest(store, "first", CPT).status == "succeeded"
    assert load_manifest(store, "second", CPT).run_id == "first"  # the reuse record leads to the run that trained


@pytest.mark.integration
def test_a_run_killed_before_its_commit_is_resumed_by_a_new_run_on_another_machine(base_model, drop, selection, tmp_path):  # noqa: F811
    options = ("--max-steps", "8", "--save-steps", "4")
    killed = start(base_model, drop, selection, tmp_path, "killed", "work-1", *options, stops=True)
    wait_for(checkpoint_published(tmp_path, "killed", 4), killed, "the checkpoint of step 4")
    killed.kill()  # SIGKILL: no failed manifest, nothing but the published checkpoints
    killed.wait(DEADLINE)
    store = open_store(str(tmp_path / "store"))
    assert list_runs(store) == {}
    resumed = cpt.run(
        config(base_model, drop, selection=str(selection), max_steps=8, save_steps=4),
        context(tmp_path / "store", tmp_path / "work-2", run_id="resumed"),
    )
    assert resumed.detail.resumed_from_step == 4 and len(resumed.detail.metrics) == 4
    reference = cpt.run(
        config(base_model, drop, selection=str(selection), max_steps=8, save_steps=4),
        context(tmp_path / "reference", tmp_path / "work-3"),
    )
    weights = Path(CPT) / "model" / "model.safetensors"
    assert sha(tmp_path / "store" / "runs" / "resumed" / weights) == sha(tmp_path / "reference" / "runs" / reference.run_id / weights)
