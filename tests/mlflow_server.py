"""Pytest plugin: a real MLflow tracking server (`mlflow server`, SQLite backend, served local artifact root).

Fixtures:
    mlflow_server   session-wide server on a free 127.0.0.1 port (started on first use, stopped at the end)
    mlflow_client   an MlflowClient of it
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .s3_server import free_ports

START_TIMEOUT_S = 180  # a cold start creates the database schema: seconds on a loaded 2-core machine, sized far above
STOP_TIMEOUT_S = 15


@dataclass
class MlflowServer:
    folder: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "mlflow-server.log"

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        if not mlflow.exists():
            pytest.fail(f"the `mlflow` command is not installed next to {sys.executable}: install the project's test extra")
        command = [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",  # artifacts go through the server (mlflow-artifacts:/), as with a remote tracker
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode} while starting:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server was not healthy after {START_TIMEOUT_S} s:\n{self._log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        import os

        os.killpg(self.process.pid, signal.SIGTERM)  # the server's gunicorn/uvicorn workers too
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_ports(1)[0])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.uri)
