"""prefect.yaml against a real `prefect server`: `prefect deploy --all` succeeds, and a process worker runs one stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import REPO_ROOT, child_env, venv_bin
from .s3_server import free_ports

pytestmark = pytest.mark.integration
STAGE_DEPLOYMENTS = ["download", "snr_scan", "layer_select", "cpt", "sft", "evaluate", "promote"]


@contextmanager
def background(command: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A server or worker in its own process group, stopped (SIGTERM, then SIGKILL) afterwards."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if process.poll() is None:
                    os.killpg(process.pid, sig)
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        continue


def wait_healthy(url: str, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server did not become healthy: {log.read_text()[-2000:]}")


def test_deploy_all_and_a_process_worker_runs_a_stage_deployment(tmp_path, tiny_model):
    (port,) = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    env = child_env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        SPECTRUM_HOME=str(REPO_ROOT),
        SPECTRUM_CUDA_IMAGE="spectrum-cuda:test",
    )
    prefect = venv_bin("prefect")

    def cli(*args: str, timeout: float = 180) -> str:
        done = subprocess.run([prefect, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    server_command = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(server_command, env, tmp_path / "server.log"):
        wait_healthy(api, tmp_path / "server.log")
        cli("work-pool", "create", "spectrum-process", "--type", "process")
        cli("work-pool", "create", "spectrum-gpu", "--type", "docker")
        out = cli("--no-prompt", "deploy", "--all")
        assert "spectrum-pipeline/pipeline" in out and "spectrum-watch/watch" in out
        listed = cli("deployment", "ls")
        for name in STAGE_DEPLOYMENTS:
            assert f"spectrum-stage/{name}" in listed
        pipeline = cli("deployment", "inspect", "spectrum-pipeline/pipeline")
        assert "0 2 * * *" in pipeline and "spectrum-process" in pipeline
        assert "spectrum-gpu" in cli("deployment", "inspect", "spectrum-stage/cpt")

        store = tmp_path / "store"
        parameters = {"options": {"model_dir": str(tiny_model)}, "store": str(store), "run_id": "deployed"}
        worker_command = [prefect, "worker", "start", "--pool", "spectrum-process"]
        with background(worker_command, env, tmp_path / "worker.log"):
            cli("deployment", "run", "spectrum-stage/snr_scan", "--params", json.dumps(parameters), "--watch", timeout=300)
            manifest = json.loads((store / "runs" / "deployed" / "snr_scan" / "manifest.json").read_text())
            assert manifest["status"] == "succeeded" and manifest["parameters"]["estimator"] == "reference"

            # a pipeline whose snr_scan and layer_select run as flow runs of their deployments, on the worker
            config = pipeline_config(tmp_path, store)
            done = subprocess.run(
                [venv_bin("spectrum"), "pipeline", "run", str(config), "--run", "dispatched"],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
    assert "snr_scan: flow run" in done.stdout or "snr_scan: flow run" in done.stderr
    layer_select = json.loads((store / "runs" / "dispatched" / "layer_select" / "manifest.json").read_text())
    assert layer_select["status"] == "succeeded" and layer_select["parameters"]["top_percent"] == 50.0
    assert (store / "runs" / "dispatched" / "evaluate" / "manifest.json").is_file()


def pipeline_config(folder: Path, store: Path) -> Path:
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
    from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

    from .helpers import TINY

    logs = domain_corpus(120, seed=8)
    model = write_tokenizer(write_synthetic_model(folder / "model", SyntheticSpec(**TINY)), logs, TINY["vocab_size"])
    (folder / "drop").mkdir()
    (folder / "drop" / "logs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in logs))
    document = {
        "model": str(model),
        "data": str(folder / "drop"),
        "store": str(store),
        "execution": {"snr_scan": "deployment", "layer_select": "deployment"},
        "stages": {"cpt": {"max_steps": 2, "seq_len": 64, "save_steps": 0}, "evaluate": {"max_tokens": 256, "seq_len": 64}},
        "report": False,
    }
    (folder / "pipeline.yaml").write_text(json.dumps(document))
    return folder / "pipeline.yaml"
