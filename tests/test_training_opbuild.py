"""DeepSpeed's op build under several processes: a killed builder's lock file no longer makes every later run wait forever."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from stages.training import opbuild

from .helpers import REPO_ROOT


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_is_waited_for(tmp_path, caplog, monkeypatch):
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    old = time.time() - opbuild.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    other = tmp_path / "py311_cpu" / "fused_adam" / "lock"  # another op's build: not ours to judge
    other.parent.mkdir()
    other.touch()
    os.utime(other, (old, old))
    with caplog.at_level(logging.WARNING), opbuild.op_build_guard(("deepspeed_shm_comm",), tmp_path):
        assert not stale.exists() and other.exists()
    assert "left by an op build that was killed" in caplog.text

    fresh = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh.parent.mkdir()
    fresh.touch()
    monkeypatch.setattr(opbuild.time, "sleep", lambda seconds: fresh.unlink())  # the live build finishes while we wait
    with opbuild.op_build_guard(("deepspeed_shm_comm",), tmp_path):
        assert not fresh.exists()
    assert "waiting for the op build" in caplog.text


def test_a_second_process_waits_for_the_first_builder(tmp_path):
    holder = (
        "import sys, time; from pathlib import Path; from stages.training import opbuild\n"
        "with opbuild.op_build_guard(('x',), Path(sys.argv[1])):\n"
        "    Path(sys.argv[2]).touch(); time.sleep(float(sys.argv[3]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path), str(tmp_path / "first"), "600"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "first").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.Popen(
            [sys.executable, "-c", holder, str(tmp_path), str(tmp_path / "second"), "0"], env=env, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while "waiting for it" not in (line := second.stderr.readline()):
            assert line and time.monotonic() < deadline, "the second process did not wait"
        assert not (tmp_path / "second").exists()
    finally:
        first.kill()  # a builder that dies releases the lock with it
    assert second.wait(120) == 0 and (tmp_path / "second").exists()
