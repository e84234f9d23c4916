"""Leases: one live holder per lease folder, on both store backends; a stage's run id is leased before any work."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from stages.base.errors import OutputExistsError
from stages.core.execution import execute_stage
from stages.core.stage import StageContext
from stages.store import FileStore, list_runs, manifest_key
from stages.store.errors import StoreUnavailableError
from stages.store.lease import LeaseHeldError, LeaseLostError, LeaseTakenError, acquire_lease, lease_state
from stages.store.manifest import lease_folder

from .helpers import child_env


def test_a_live_lease_refuses_a_second_holder_and_names_the_first(store):
    acquire_lease(store, "locks/a", {"host": "h1", "pid": 11}, timeout=60)
    with pytest.raises(LeaseHeldError, match="pid 11") as caught:
        acquire_lease(store, "locks/a", {"host": "h2", "pid": 22}, timeout=60)
    assert caught.value.exit_code == 4
    state = lease_state(store, "locks/a")
    assert state.live and state.generation == 0 and state.holder == {"host": "h1", "pid": 11}


def test_a_released_lease_is_taken_at_once_by_the_next_generation(store):
    acquire_lease(store, "locks/b", {"pid": 1}, timeout=60).release("failed", "boom")
    state = lease_state(store, "locks/b")
    assert not state.live and state.released["outcome"] == "failed" and state.released["reason"] == "boom"
    second = acquire_lease(store, "locks/b", {"pid": 2}, timeout=60)
    assert second.generation == 1 and lease_state(store, "locks/b").holder == {"pid": 2}


def test_a_silent_holder_expires_and_heartbeats_keep_a_holder_alive(tmp_path):
    store = FileStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/c", {"pid": 1}, timeout=0.6)
    with lease.heartbeat():
        time.sleep(1.5)  # several timeouts, renewed every timeout/4
        with pytest.raises(LeaseHeldError):
            acquire_lease(store, "locks/c", {"pid": 2}, timeout=0.6)
    time.sleep(0.8)  # no heartbeat now: the holder looks dead
    assert lease_state(store, "locks/c").expired
    assert acquire_lease(store, "locks/c", {"pid": 2}, timeout=0.6).generation == 1


def test_of_two_processes_taking_over_at_once_exactly_one_wins(store):
    acquire_lease(store, "locks/d", {"pid": 0}, timeout=0.2)
    time.sleep(0.4)  # expired: generation 1 is up for grabs
    results: list[object] = []
    barrier = threading.Barrier(4)

    def take(pid: int) -> None:
        barrier.wait()
        try:
            results.append(acquire_lease(store, "locks/d", {"pid": pid}, timeout=60).generation)
        except LeaseHeldError as exc:
            results.append(exc)

    threads = [threading.Thread(target=take, args=(pid,)) for pid in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r for r in results if isinstance(r, int)) == [1]
    assert sum(isinstance(r, LeaseHeldError) for r in results) == 3


class FlakyStore(FileStore):
    """A file store whose writes fail while `down` is set (a brief S3 outage)."""

    down = False

    def put_bytes(self, key, data):
        if self.down:
            raise StoreUnavailableError("the store is down")
        return super().put_bytes(key, data)


def test_a_brief_outage_is_retried_and_the_heartbeat_survives(tmp_path):
    store = FlakyStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/e", {"pid": 1}, timeout=2.0)
    lost = []
    with lease.heartbeat(on_lost=lambda: lost.append(True)):
        store.down = True
        time.sleep(0.8)  # shorter than timeout/2: retried, not lost
        store.down = False
        time.sleep(1.0)
        assert lease_state(store, "locks/e").live
    assert not lost


def test_a_holder_that_cannot_renew_stops_its_work_before_the_lease_expires(tmp_path):
    store = FlakyStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/f", {"pid": 1}, timeout=1.0)
    stopped = threading.Event()
    with pytest.raises(LeaseLostError, match="could not be renewed") as caught, lease.heartbeat(on_lost=stopped.set):
        store.down = True
        assert stopped.wait(5), "on_lost was never called"
        stopped_at = time.time()
    assert stopped_at - lease.last_renewed < lease.timeout  # stopped while the lease was still its own
    assert caught.value.exit_code == 2


_BACKGROUND_HOLDER = """
import contextlib, signal, sys, time
from pathlib import Path
from stages.store import FileStore
from stages.store.errors import StoreUnavailableError
from stages.store.lease import LeaseLostError, acquire_lease

class Down(FileStore):
    down = False
    def put_bytes(self, key, data):
        if self.down:
            raise StoreUnavailableError("the store is down")
        return super().put_bytes(key, data)

store = Down(Path(sys.argv[1]))
# nested: a long lease (a watcher's claim) holds the short one (a stage's), which is lost first
outer = acquire_lease(store, "locks/outer", {"pid": 1}, timeout=240.0) if sys.argv[2] == "nested" else None
started = time.monotonic()
try:
    with outer.heartbeat() if outer else contextlib.nullcontext():
        lease = acquire_lease(store, "locks/bg", {"pid": 1}, timeout=1.0)
        with lease.heartbeat():  # the default on_lost: interrupt the main thread
            store.down = True
            while time.monotonic() < started + 60:  # the work; a hang guard
                time.sleep(0.05)
except LeaseLostError as lost:
    assert "locks/bg" in str(lost), lost
print("stopped" if time.monotonic() - started < 30 else "worked-on", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""


@pytest.mark.parametrize("leases", ["single", "nested"])
def test_a_holder_started_in_the_background_with_sigint_ignored_still_stops_its_work(tmp_path, leases):
    """`nohup spectrum watch … &` inherits SIGINT ignored, where interrupt_main alone does nothing.

    Nested: a stage's lease, lost inside a watcher's claim that is still live, stops the work too.
    """
    done = subprocess.run(
        [sys.executable, "-c", _BACKGROUND_HOLDER, str(tmp_path / "store"), leases],
        env=child_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 - as a background shell job starts
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stopped", "True"]  # stopped, and SIGINT ignored again afterwards


def test_two_processes_with_one_run_id_one_fails_at_once_and_writes_nothing(tmp_path):
    store = FileStore(tmp_path / "store")
    started, finish = threading.Event(), threading.Event()

    def slow(stage_run):
        started.set()
        assert finish.wait(30)
        return [stage_run.put_bytes("out.txt", b"result")]

    first: list = []
    thread = threading.Thread(
        target=lambda: first.append(execute_stage("snr_scan", StageContext(store=store, run_id="nightly"), {"p": 1}, [], slow))
    )
    thread.start()
    assert started.wait(30)
    with pytest.raises(LeaseHeldError, match="being run by another process") as caught:
        execute_stage("snr_scan", StageContext(store=store, run_id="nightly"), {"p": 1}, [], lambda run: [])
    assert "--run-id" in str(caught.value)
    assert not store.exists(manifest_key("nightly", "snr_scan"))  # the loser wrote no (failed) manifest
    finish.set()
    thread.join()
    assert first[0].manifest.status == "succeeded" and list_runs(store) == {"nightly": ["snr_scan"]}
    assert lease_state(store, lease_folder("nightly", "snr_scan")).released["outcome"] == "succeeded"
    with pytest.raises(OutputExistsError, match="already has a committed"):  # the lease is free, the run is final
        execute_stage("snr_scan", StageContext(store=store, run_id="nightly"), {"p": 2}, [], lambda run: [])


def test_a_failed_stage_releases_its_lease_with_the_outcome(tmp_path):
    store = FileStore(tmp_path / "store")

    def broken(stage_run):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        execute_stage("snr_scan", StageContext(store=store, run_id="r1"), {"p": 1}, [], broken)
    assert lease_state(store, lease_folder("r1", "snr_scan")).released["outcome"] == "failed"


@pytest.mark.integration
def test_a_second_cli_process_with_the_same_run_id_exits_4_before_any_work(tmp_path, tiny_model):
    store = tmp_path / "store"
    gate = tmp_path / "gate"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from stages.core.execution import execute_stage\n"
            "from stages.core.stage import StageContext\n"
            "from stages.store import FileStore\n"
            "def slow(run):\n"
            "    pathlib.Path(sys.argv[2]).write_text('started')\n"
            "    while pathlib.Path(sys.argv[2]).read_text() != 'go': time.sleep(0.05)\n"
            "    return []\n"
            "execute_stage('snr_scan', StageContext(store=FileStore(pathlib.Path(sys.argv[1])), run_id='nightly'), {}, [], slow)\n",
            str(store),
            str(gate),
        ],
        env=child_env(),
    )
    try:
        deadline = time.time() + 300
        while not (gate.exists() and gate.read_text() == "started"):
            assert holder.poll() is None and time.time() < deadline, "the holder did not start"
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "stages.snr_scan", str(tiny_model), "--store", str(store), "--run-id", "nightly", "--no-progress"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=600,
        )
        assert second.returncode == 4, second.stderr
        assert second.stderr.startswith("error: the snr_scan stage of run 'nightly' is being run by another process")
        assert "Traceback" not in second.stderr
    finally:
        gate.write_text("go")
        assert holder.wait(300) == 0


@pytest.mark.parametrize(
    ("error", "outcome", "reason"),
    [(None, "succeeded", None), (RuntimeError("boom"), "failed", "boom"), (KeyboardInterrupt(), "interrupted", ""),
     (LeaseLostError("gone"), "lost", "gone")],
)  # fmt: skip
def test_work_held_under_a_lease_releases_it_with_its_outcome(tmp_path, error, outcome, reason):
    store = FileStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/g", {"pid": 1}, timeout=60)
    with pytest.raises(type(error)) if error else contextlib.nullcontext(), lease.held(reason=str):
        if error:
            raise error
    released = lease_state(store, "locks/g").released
    assert released["outcome"] == outcome and (reason is None or released["reason"] == reason)


def test_work_that_releases_the_lease_itself_keeps_its_outcome(tmp_path):
    store = FileStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/h", {"pid": 1}, timeout=60)
    with lease.held():
        lease.release("reused")
    assert lease_state(store, "locks/h").released["outcome"] == "reused"


def test_a_holder_whose_lease_was_taken_over_while_it_was_paused_stops_its_work(tmp_path):
    """Paused past its timeout (SIGSTOP, swapping), the holder finds a later generation at its next beat and stops."""
    store = FileStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/t", {"pid": 1}, timeout=1.0)
    stopped = threading.Event()
    with pytest.raises(LeaseTakenError, match=r"taken over \(generation 1\)") as caught, lease.heartbeat(on_lost=stopped.set):
        store.put_bytes("locks/t/1.json", b'{"holder": {"pid": 2}, "acquired_at": 0, "timeout": 1.0}')  # the taker's claim
        assert stopped.wait(30), "on_lost was never called"  # a hang guard
    assert caught.value.exit_code == 2


class _SteppedClock:
    """The lease module's `time`, whose wall clock was stepped back an hour (NTP) after the lease was taken."""

    stepped = False

    def time(self) -> float:
        return time.time() - (3600 if self.stepped else 0)

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_wall_clock_stepped_back_does_not_keep_a_silent_holder_working(tmp_path, monkeypatch):
    from stages.store import lease as lease_module

    clock = _SteppedClock()
    monkeypatch.setattr(lease_module, "time", clock)
    store = FlakyStore(tmp_path / "store")
    lease = acquire_lease(store, "locks/c", {"pid": 1}, timeout=1.0)
    stopped = threading.Event()
    with pytest.raises(LeaseLostError, match="could not be renewed"), lease.heartbeat(on_lost=stopped.set):
        clock.stepped = True
        store.down = True
        assert stopped.wait(30), "on_lost was never called"  # a hang guard
