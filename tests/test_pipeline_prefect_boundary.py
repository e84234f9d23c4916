"""What crosses into Prefect: no secret reaches its database, its temporary server dies with its process, a failed start is one line."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.prefect_api import PrefectUnavailableError, scrub, scrubbed
from stages.base.errors import InputError

from .helpers import REPO_ROOT, child_env

SECRET = "TopSecret123"


def test_scrub_hides_url_credentials_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-4f9a8b7c6d")
    assert scrub(f"https://user:{SECRET}@host/x and tok-4f9a8b7c6d") == "https://***@host/x and ***"
    try:
        try:
            raise OSError(f"cannot reach https://u:{SECRET}@host")
        except OSError as cause:
            raise InputError("the drop cannot be read") from cause
    except InputError as exc:
        clean = scrubbed(exc)  # the cause carries the secret: a copy without it, same class
    assert type(clean) is InputError and str(clean) == "the drop cannot be read" and clean.__cause__ is None
    plain = InputError("nothing secret")
    assert scrubbed(plain) is plain


@pytest.mark.integration
def test_a_credential_in_the_config_never_reaches_prefects_database(prefect_api, tiny_model, tmp_path):
    from prefect import get_client
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline_flow

    document = {"model": str(tiny_model), "data": f"https://reader:{SECRET}@data.example.invalid/drop", "store": "store", "report": False}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(InputError) as caught:
        pipeline_flow(str(tmp_path / "pipeline.yaml"), run="leaky")
    assert SECRET not in str(caught.value) and "https://***@data.example.invalid" in str(caught.value)
    for logger in [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        for handler in logger.handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()  # the log lines reach the server
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
        stored = [*flow_runs, *task_runs, *client.read_logs(), *client.read_artifacts()]
        stored += [state for run in flow_runs for state in client.read_flow_run_states(run.id)]
        stored += [state for run in task_runs for state in client.read_task_run_states(run.id)]
    text = "\n".join(item.model_dump_json() for item in stored)
    assert any(run.state.is_failed() for run in task_runs) and "https://***@data.example.invalid" in text  # the failure is there
    assert {run.name for run in task_runs if run.state.is_failed()} == {"download"}  # named after the stage that failed
    assert SECRET not in text


@pytest.mark.integration
def test_the_temporary_prefect_server_dies_with_a_killed_pipeline(tmp_path):
    """kill -9 of the process that started it (an OOM kill): its temporary server must not live on under PID 1."""
    probe = (
        "import time; from flows.prefect_api import start_prefect; from flows import prefect_server; "
        "start_prefect(); print(prefect_server.launched().process.pid, flush=True); time.sleep(3600)"
    )
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL="")
    process = subprocess.Popen([sys.executable, "-c", probe], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        server = int(process.stdout.readline())  # the server answered its health check
        assert Path(f"/proc/{server}").exists()
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 120  # a hang guard
    while _alive(server):
        assert time.monotonic() < deadline, f"the temporary server {server} outlived its pipeline"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_temporary_server_that_does_not_start_is_one_error_line(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import prefect_server
    from flows.prefect_api import STARTUP_SECONDS, start_prefect

    waited = []

    class Silent:
        def wait(self, timeout):
            waited.append(timeout)
            raise prefect_server.ServerStartError(f"no answer from http://127.0.0.1:1/api/health within {timeout} s")

    monkeypatch.setattr(prefect_server, "launch", Silent)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(PrefectUnavailableError) as caught:
        start_prefect()
    assert waited == [STARTUP_SECONDS] and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"the temporary Prefect server did not start within {STARTUP_SECONDS} s (no answer")


def test_a_temporary_server_that_exits_names_its_status_and_error_and_a_taken_port_is_retried(monkeypatch, tmp_path):
    """uvicorn exits 3 when it cannot start: for a taken port it is launched again on another; any other failure is the error."""
    from flows import prefect_server

    taken = "[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): address already in use\nTraceback: shutdown"
    failures = iter([taken, "port {port}: unable to open database file. Application startup failed. Exiting."])
    ports = []

    def spawn(port, errors):
        ports.append(port)
        script = f"import sys; sys.stderr.write({next(failures).format(port=port)!r}); sys.exit(3)"
        return subprocess.Popen([sys.executable, "-c", script], stderr=errors)

    monkeypatch.setattr(prefect_server, "_spawn", spawn)
    monkeypatch.setattr(prefect_server, "_launched", None)
    server = prefect_server.launch()
    with pytest.raises(prefect_server.ServerStartError) as caught:
        server.wait(timeout=120)  # a hang guard
    assert len(ports) == 2 and ports[0] != ports[1]  # launched again for the taken port only
    assert str(caught.value) == (
        f"the server process exited with status 3: port {ports[1]}: unable to open database file. Application startup failed. Exiting."
    )


def test_a_port_taken_again_and_again_is_tried_a_bounded_number_of_times(monkeypatch):
    from flows import prefect_server

    ports = []

    def spawn(port, errors):
        ports.append(port)
        script = "import sys; sys.stderr.write('[Errno 98] error while attempting to bind: address already in use'); sys.exit(3)"
        return subprocess.Popen([sys.executable, "-c", script], stderr=errors)

    monkeypatch.setattr(prefect_server, "_spawn", spawn)
    monkeypatch.setattr(prefect_server, "_launched", None)
    with pytest.raises(prefect_server.ServerStartError, match="status 3: .*address already in use"):
        prefect_server.launch().wait(timeout=120)  # a hang guard
    assert len(ports) == 1 + prefect_server.RELAUNCHES
