"""A stage in its own process reports back through --record: the manifest and whether it was reused, nothing scraped."""

from __future__ import annotations

import pytest

from stages.base.errors import InputError
from stages.core.record import read_record, write_record
from stages.core.stage import StageResult
from stages.store import start_manifest


@pytest.mark.parametrize("cached", [True, False])
def test_a_record_reads_back_the_manifest_and_whether_it_was_reused(tmp_path, cached):
    manifest = start_manifest("layer_select", "0.2.0", "r1", {"top_percent": 25}, []).finish([])
    write_record(tmp_path / "record.json", StageResult("layer_select", ("line",), manifest, cached))
    read, reused = read_record(tmp_path / "record.json")
    assert read.to_json() == manifest.to_json() and reused is cached


@pytest.mark.parametrize("content", [b"", b"{}", b'{"cached": true}', b"[1, 2]"])
def test_a_file_that_is_not_a_record_is_a_clear_error(tmp_path, content):
    (tmp_path / "record.json").write_bytes(content)
    with pytest.raises(InputError, match="is not one written by --record"):
        read_record(tmp_path / "record.json")


def test_compare_execution_modes_name_an_arm_stage_and_a_mode():
    from stages.compare import CompareConfig, execution_modes

    modes = ("in-process", "subprocess", "deployment")
    assert execution_modes(CompareConfig(model="m"), modes) == {"cpt": "subprocess"}
    chosen = execution_modes(CompareConfig(model="s3://b/m", execution=["cpt=subprocess", "evaluate=subprocess"]), modes)
    assert chosen == {"cpt": "subprocess", "evaluate": "subprocess"}
    with pytest.raises(InputError, match=r"MODEL m is a local path, but an arm's stage runs as a deployment"):
        execution_modes(CompareConfig(model="m", execution=["cpt=deployment"]), modes)
    stored = CompareConfig(model="store:models/sha256-1", data="s3://b/drop", execution=["cpt=deployment"])
    assert execution_modes(stored, modes)["cpt"] == "deployment"
    for bad in ("cpt", "sft=subprocess", "cpt=docker"):
        with pytest.raises(InputError, match=rf"--execution '{bad}': expected STAGE=MODE"):
            execution_modes(CompareConfig(model="m", execution=[bad]), modes)


def test_a_stage_that_fails_in_its_own_process_says_why(tmp_path, capfd):
    """The child's `error:` line reaches the caller's exception (the flow state, the notification) and still passes through."""
    from stages import layer_select
    from stages.core.process import StageProcessError, run_in_own_process
    from stages.core.stage import StageContext
    from stages.store import open_store

    context = StageContext(open_store(str(tmp_path / "store")), work_dir=tmp_path / "work", progress=False)
    config = layer_select.SelectConfig(snr_input=str(tmp_path / "missing.parquet"), top_percent=25)
    with pytest.raises(StageProcessError, match=r"failed in its own process \(exit 2\): .*missing\.parquet"):
        run_in_own_process(layer_select.STAGE, config, context, "subprocess")
    assert "error: " in capfd.readouterr().err


def test_the_error_line_is_found_after_a_progress_bar_and_odd_bytes():
    import os
    import sys

    from stages.core.process import _run_passing_stderr

    script = "import sys; sys.stderr.buffer.write(b'bar 50%\\rbar 99%\\r\\xff\\xfe\\nerror: boom here\\n'); print('out'); sys.exit(2)"
    returncode, stdout, error = _run_passing_stderr([sys.executable, "-c", script], dict(os.environ))
    assert (returncode, stdout.strip(), error) == (2, "out", "boom here")


def test_a_caller_stopped_while_its_stage_process_runs_stops_the_child():
    """Ctrl-C or SIGTERM in the caller must not leave it waiting hours for a training child (a hang guard, not a timing check)."""
    import os
    import signal
    import sys
    import time

    from stages.core.process import _run_passing_stderr

    class Stopped(Exception):
        pass

    def stop(*_):
        raise Stopped

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(2)
    started = time.monotonic()
    try:
        with pytest.raises(Stopped):
            _run_passing_stderr([sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 300
