"""Notifications: one JSON post per pipeline run to a real local receiver; a receiver down or slow never fails or holds the run."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flows import pipeline
from flows.integration_settings import shown_url
from flows.pipeline import run_pipeline
from flows.pipeline_config import load_pipeline_config, parse_pipeline_config
from stages.base.errors import InputError
from stages.store.compute import Prices

from .test_pipeline import inputs, write_config  # noqa: F401 - the tiny pipeline's inputs fixture

SECRET = "T0SECRET/B0SECRET/xoxbSecretToken"
DATA_SECRET = "Pw0rdSecret99"  # a credential in the config's data URL
HANG_GUARD_S = 600


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST's JSON; with `hold`, answers only once released."""

    def __init__(self, hold: bool = False) -> None:
        self.posts: list[dict] = []
        self.paths: list[str] = []
        self.received = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append(json.loads(body))
                receiver.paths.append(self.path)
                receiver.received.set()
                if hold:
                    receiver.release.wait(HANG_GUARD_S)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/services/{SECRET}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(hold: bool = False) -> Receiver:
        made.append(Receiver(hold))
        return made[-1]

    yield make
    for item in made:
        item.close()


def config_in(folder: Path, notify: dict, **document) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"model": "m", "data": "d", "store": "store", "report": False, "notify": notify, **document}
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(body))
    return folder / "pipeline.yaml"


def no_stages(config, store, result, *args) -> None:
    """A pipeline with nothing to run: the run, its lease and its end are real."""


# --- the config ---------------------------------------------------------------------------------------------------


def test_notify_tracking_and_cost_are_off_unless_configured(tmp_path):
    plain = parse_pipeline_config({"model": "m", "data": "d"}, tmp_path / "p.yaml")
    assert (plain.notify, plain.tracking, plain.cost) == (None, None, None)
    document = {
        "model": "m",
        "data": "d",
        "notify": {"webhook": f"https://hooks.example.com/services/{SECRET}", "on": ["failed"], "timeout_seconds": 2},
        "tracking": {"mlflow": {"tracking_uri": "http://mlflow.example.com:5000", "experiment": "acme"}},
        "cost": {"price_per_device_hour": {"cuda": 4.5, "cpu": 0.05}, "currency": "$"},
    }
    config = parse_pipeline_config(document, tmp_path / "p.yaml")
    assert config.notify.on == ("failed",) and config.notify.timeout_seconds == 2.0
    assert config.tracking.tracking_uri == "http://mlflow.example.com:5000" and config.tracking.experiment == "acme"
    assert config.cost.prices == Prices({"cuda": 4.5, "cpu": 0.05}) and config.cost.currency == "$"
    assert SECRET not in repr(config) and config.notify.shown_webhook == "https://hooks.example.com/***"
    local = parse_pipeline_config({"model": "m", "data": "d", "tracking": {"mlflow": {"tracking_uri": "mlruns"}}}, tmp_path / "p.yaml")
    assert local.tracking.tracking_uri == str(tmp_path / "mlruns") and local.tracking.experiment == "spectrum"


def test_the_tracking_uri_defaults_to_mlflows_variable(tmp_path, monkeypatch):
    document = {"model": "m", "data": "d", "tracking": {"mlflow": {}}}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert parse_pipeline_config(document, tmp_path / "p.yaml").tracking.tracking_uri == "http://tracker:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://me:hunter2secret@tracker:5000")
    refused = r"^\$MLFLOW_TRACKING_URI \(the default of .*\): http://tracker:5000/\*\*\* carries credentials"
    with pytest.raises(InputError, match=refused) as e:
        parse_pipeline_config(document, tmp_path / "p.yaml")
    assert "hunter2secret" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(InputError, match=r"tracking.mlflow.tracking_uri: missing, and \$MLFLOW_TRACKING_URI is not set"):
        parse_pipeline_config(document, tmp_path / "p.yaml")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"notify": {"webhook": f"ftp://host/{SECRET}"}}, r"notify.webhook: ftp://host/\*\*\* is not an http\(s\) URL"),
        ({"notify": {"webhook": f"https://host:99999/{SECRET}"}}, r"notify.webhook: .* is not an http\(s\) URL with a host"),
        ({"notify": {"webhook": "https:///x"}}, r"notify.webhook: https://\?/\*\*\* is not an http\(s\) URL with a host"),
        ({"notify": {"on": ["failed"]}}, r"notify.webhook: missing"),
        ({"notify": {"webhook": f"https://h/{SECRET}", "on": ["finished"]}}, r"notify.on: 'finished' is not one of failed, completed"),
        ({"notify": {"webhook": f"https://h/{SECRET}", "on": []}}, r"notify.on: expected a list of failed and/or completed"),
        ({"notify": {"webhook": f"https://h/{SECRET}", "timeout_seconds": 0}}, r"notify.timeout_seconds: expected seconds in \(0, 60\]"),
        ({"notify": {"webhook": f"https://h/{SECRET}", "timeout": 5}}, r"notify.timeout: not a setting \(did you mean timeout_seconds\?\)"),
        ({"notify": f"https://h/{SECRET}"}, r"notify: expected a mapping \(webhook:, on:, timeout_seconds:\), found str"),
        ({"tracking": {"wandb": {}}}, r"tracking.wandb: not a setting; the settings are mlflow"),
        ({"tracking": {}}, r"tracking.mlflow: missing"),
        ({"tracking": {"mlflow": {"tracking_uri": "http://u:pw12345678@h:5000"}}}, r"tracking_uri: http://h:5000/\*\*\* carries"),
        ({"tracking": {"mlflow": {"uri": "http://h"}}}, r"tracking.mlflow.uri: not a setting"),
        ({"tracking": {"mlflow": {"tracking_uri": "http://h", "experiment": ""}}}, r"tracking.mlflow.experiment: expected an experiment"),
        ({"cost": {"price_per_device_hour": -1}}, r"cost.price_per_device_hour: a price per device-hour must be a number >= 0"),
        ({"cost": {"price_per_gpu_hour": 4}}, r"cost.price_per_gpu_hour: not a setting \(did you mean price_per_device_hour\?\)"),
        ({"cost": {"price_per_device_hour": 4, "currency": 5}}, r"cost.currency: expected a short currency mark"),
        ({"notify": {"webhook": f"https://[host/{SECRET}"}}, r"notify.webhook: https://\?/\*\*\* is not an http\(s\) URL with a host"),
        ({"tracking": {"mlflow": {"tracking_uri": f"http://[h/{SECRET}"}}}, r"tracking_uri: http://\?/\*\*\* cannot be read as a URI"),
        ({"tracking": {"mlflow": {"tracking_uri": "https://u:pw12345678@h/x"}}}, r"tracking_uri: https://h/\*\*\* carries credentials: "),
    ],
)
def test_bad_notify_tracking_and_cost_sections_name_the_key_and_never_show_the_secret(tmp_path, section, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_pipeline_config({"model": "m", "data": "d", **section}, tmp_path / "pipeline.yaml")
    assert str(caught.value).startswith(f"{tmp_path / 'pipeline.yaml'}: ") or "MLFLOW" in str(caught.value)
    assert SECRET not in str(caught.value) and "pw12345678" not in str(caught.value)


def test_a_shown_url_keeps_only_scheme_host_and_port():
    assert shown_url(f"https://user:pw@hooks.slack.com/services/{SECRET}?x=1") == "https://hooks.slack.com/***"
    assert shown_url(f"http://127.0.0.1:8080/{SECRET}") == "http://127.0.0.1:8080/***"
    assert shown_url(f"https://[hooks.slack.com/{SECRET}") == "https://?/***"  # unreadable: never a ValueError



# --- the post -----------------------------------------------------------------------------------------------------


def test_a_completed_run_posts_once_and_the_url_is_nowhere(tmp_path, monkeypatch, receiver, caplog, capsys):
    hook = receiver()
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    config = load_pipeline_config(config_in(tmp_path, {"webhook": hook.url}))
    with caplog.at_level(logging.DEBUG):
        result = run_pipeline(config, run="n1")
    (post,) = hook.posts
    assert hook.paths == [f"/services/{SECRET}"]
    assert post["run_id"] == "n1" and post["status"] == "completed" and post["error"] is None and post["failed_step"] is None
    assert post["text"].startswith("Spectrum pipeline run n1 completed\n") and post["stages_run"] == [] and post["gpu_hours"] == 0
    assert isinstance(post["wall_seconds"], float) and post["store"].endswith(str(tmp_path / "store"))
    out = capsys.readouterr()
    seen = caplog.text + out.out + out.err + repr(result) + "".join(p.read_text(errors="replace") for p in _files(tmp_path / "store"))
    assert SECRET not in seen and "/services/" not in seen


def test_only_the_outcomes_named_in_on_are_posted(tmp_path, monkeypatch, receiver):
    hook = receiver()
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    run_pipeline(load_pipeline_config(config_in(tmp_path, {"webhook": hook.url, "on": ["failed"]})), run="quiet")
    assert hook.posts == []


def test_a_receiver_that_never_answers_holds_the_run_only_for_the_timeout(tmp_path, monkeypatch, receiver, caplog):
    hook = receiver(hold=True)
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    config = load_pipeline_config(config_in(tmp_path, {"webhook": hook.url, "timeout_seconds": 0.5}))
    with caplog.at_level(logging.WARNING):
        result = run_pipeline(config, run="slow")  # returns while the receiver still holds the request (released on teardown)
    assert result.run_id == "slow" and hook.received.is_set() and not hook.release.is_set()
    (warning,) = [r for r in caplog.records if r.name == "flows.notify"]
    assert "did not reach http://127.0.0.1:" in warning.getMessage() and "/***" in warning.getMessage()
    assert SECRET not in caplog.text


def test_a_refused_connection_is_one_warning_and_the_run_succeeds(tmp_path, monkeypatch, caplog):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    config = load_pipeline_config(config_in(tmp_path, {"webhook": f"http://127.0.0.1:{port}/services/{SECRET}", "timeout_seconds": 5}))
    with caplog.at_level(logging.WARNING):
        assert run_pipeline(config, run="down").run_id == "down"
    (warning,) = [r for r in caplog.records if r.name == "flows.notify"]
    message = warning.getMessage()
    assert f"did not reach http://127.0.0.1:{port}/*** (ConnectError" in message and "the run is not affected" in message
    assert SECRET not in caplog.text


def test_httpx_s_own_form_of_the_webhook_is_hidden_in_its_log(tmp_path, monkeypatch, caplog):
    """httpx logs the URL lower-cased, without its default port and percent-encoded: that form is hidden too."""
    import httpx

    from flows.integration_settings import NotifySettings
    from flows.notify import RunEnd, notify

    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **options: client(transport=httpx.MockTransport(answer), **options))
    webhook = f"https://Hooks.Example.COM:443/services/{SECRET}/a b"
    with caplog.at_level(logging.DEBUG):
        assert notify(NotifySettings(webhook), RunEnd("r1", "completed", "store", 1.0)) is True
    assert seen == [f"https://hooks.example.com/services/{SECRET}/a%20b"]  # the form httpx sends and logs
    requests = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert requests and all("https://hooks.example.com:443/***" in message for message in requests), requests
    assert SECRET not in caplog.text and "/services/" not in caplog.text


# --- a run that fails before it holds its lease ---------------------------------------------------------------------


def test_a_run_whose_store_cannot_be_reached_posts_a_failure_at_start(tmp_path, monkeypatch, receiver):
    from stages.store import StoreUnavailableError

    from .s3_server import free_ports

    hook = receiver()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY12345")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-value")
    monkeypatch.setenv("SPECTRUM_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    config = load_pipeline_config(config_in(tmp_path, {"webhook": hook.url}, store="s3://spectrum-runs/prod"))
    with pytest.raises(StoreUnavailableError) as caught:
        run_pipeline(config, run="unreached")
    (post,) = hook.posts
    assert (post["status"], post["run_id"], post["failed_step"]) == ("failed", "unreached", "start")
    assert post["stages_run"] == [] and post["store"] == "s3://spectrum-runs/prod" and post["error"] == str(caught.value)[:500]
    assert post["text"].startswith("Spectrum pipeline run unreached failed at start: ")
    assert "not-a-real-secret-value" not in json.dumps(post)


def test_a_run_held_by_another_pipeline_posts_a_failure_at_start_and_leaves_the_lease(tmp_path, monkeypatch, receiver):
    from stages.store import open_store
    from stages.store.lease import LeaseHeldError, acquire_lease, lease_state
    from stages.store.manifest import lease_folder

    hook = receiver()
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    config = load_pipeline_config(config_in(tmp_path, {"webhook": hook.url}))
    store = open_store(str(tmp_path / "store"))
    folder = lease_folder("busy", pipeline.PIPELINE_LEASE)
    acquire_lease(store, folder, {"host": "elsewhere", "pid": 1, "run_id": "busy"})
    with pytest.raises(LeaseHeldError, match="is being run by another pipeline"):
        run_pipeline(config, run="busy")
    (post,) = hook.posts
    assert (post["status"], post["run_id"], post["failed_step"]) == ("failed", "busy", "start")
    assert "being run by another pipeline" in post["error"] and post["text"].startswith("Spectrum pipeline run busy failed at start: ")
    assert lease_state(store, folder).released is None  # the other pipeline's lease is untouched


def test_a_config_error_found_before_the_run_is_not_posted(tmp_path, monkeypatch, receiver):
    hook = receiver()
    monkeypatch.setattr(pipeline, "_run_stages", no_stages)
    monkeypatch.delenv("SPECTRUM_STORE", raising=False)
    config = load_pipeline_config(config_in(tmp_path, {"webhook": hook.url}))
    with pytest.raises(InputError, match="re-runs a stage of a committed run"):
        run_pipeline(config, only="cpt")
    with pytest.raises(InputError, match="store: missing"):
        run_pipeline(load_pipeline_config(config_in(tmp_path / "nostore", {"webhook": hook.url}, store=None)), run="n")
    assert hook.posts == []


def test_a_run_that_fails_posts_its_failing_step_and_error_once(prefect_api, tmp_path, receiver, tiny_model):
    hook = receiver()
    config = load_pipeline_config(
        config_in(tmp_path, {"webhook": hook.url}, model=str(tiny_model), data=f"https://reader:{DATA_SECRET}@data.example.invalid/drop")
    )
    with pytest.raises(InputError) as caught:
        run_pipeline(config, run="broken")
    (post,) = hook.posts
    assert post["status"] == "failed" and post["run_id"] == "broken" and post["failed_step"] == "download"
    assert post["error"] and "\n" not in post["error"] and len(post["error"]) <= 500 and "data.example.invalid" in post["error"]
    assert post["text"].startswith("Spectrum pipeline run broken failed at download: ")
    assert DATA_SECRET not in json.dumps(post) and DATA_SECRET not in str(caught.value) and "https://***@data" in post["error"]


def test_an_interrupted_run_posts_a_failure_and_stays_interrupted(tmp_path, monkeypatch, receiver):
    hook = receiver()

    def interrupted(config, store, result, *args):
        result.step = "cpt"
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run_stages", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline_config(config_in(tmp_path, {"webhook": hook.url})), run="stopped")
    (post,) = hook.posts
    assert (post["status"], post["failed_step"], post["error"]) == ("failed", "cpt", "interrupted (SIGTERM or Ctrl-C)")


@pytest.mark.integration
def test_a_completed_pipeline_flow_posts_its_stages_evaluation_cost_and_report(prefect_api, inputs, tmp_path, receiver):  # noqa: F811
    from prefect import get_client

    from flows.pipeline import pipeline_flow

    hook = receiver()
    evaluate = {"seq_len": 64, "max_tokens": 256, "general": str(inputs / "general.txt"), "snr_drift": False}
    config = write_config(tmp_path, inputs, str(tmp_path / "store"), sft=None, evaluate=evaluate)
    document = yaml.safe_load(config.read_text())
    document["notify"] = {"webhook": hook.url}
    document["cost"] = {"price_per_device_hour": 2.0, "currency": "$"}
    config.write_text(yaml.safe_dump(document))
    outcome = pipeline_flow(str(config), run="told")
    (post,) = hook.posts  # exactly once: the flow and run_pipeline do not both post
    assert post["status"] == "completed" and post["run_id"] == "told"
    assert post["stages_run"] == ["download", "snr_scan", "layer_select", "cpt", "evaluate"] and post["stages_reused"] == []
    assert post["report"] == outcome["report"] and Path(post["report"]).is_file()
    metrics = {(e["metric"], e["dataset"]) for e in post["evaluation"]}
    assert ("perplexity", "heldout") in metrics or any(m == "perplexity" for m, _ in metrics), post["evaluation"]
    for entry in post["evaluation"]:
        assert entry["delta"] == pytest.approx(entry["trained"] - entry["base"])
    assert post["device_hours"] and post["cost"] == pytest.approx(2.0 * sum(post["device_hours"].values()), abs=1e-3)
    assert "cost $" in post["text"] and "perplexity on " in post["text"] and f"report: {outcome['report']}" in post["text"]
    assert outcome["compute"].endswith(f"cost ${post['cost']:.2f}") and outcome["compute"] in post["text"]
    with get_client(sync_client=True) as client:
        stored = [*client.read_flow_runs(), *client.read_task_runs(), *client.read_logs(), *client.read_artifacts()]
    assert SECRET not in "\n".join(item.model_dump_json() for item in stored)
    assert not any(SECRET in p.read_text(errors="replace") for p in _files(tmp_path / "store"))

    again = pipeline_flow(str(config), run="told-again")  # every stage reused: nothing run, no device time spent
    assert again["cached"] == post["stages_run"]
    second = hook.posts[1]
    assert second["stages_run"] == [] and second["stages_reused"] == post["stages_run"] and second["gpu_hours"] == 0
    assert second["device_hours"] == {} or not any(second["device_hours"].values())


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
