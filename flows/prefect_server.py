"""Prefect's temporary API server in a process of its own, launched before Prefect is imported here.

Prefect starts the same server (uvicorn serving `prefect.server.api.server:create_app`, UI off)
when no API is configured, but only from a class in its server module, whose import costs this
process ~2.5 s on 2 cores, and it then waits ~3 s for the server to answer. Launched here, with
the standard library only, the server boots in its own process while this one imports Prefect
and the pipeline: `spectrum demo` run again (every stage reused) went from 10.6 s to ~6 s.

The server is tied to this process: it gets SIGTERM when the thread that launched it (the main
thread) ends, even on kill -9 (Linux: PR_SET_PDEATHSIG), and it is stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import util

STARTUP_FAILURE = 3  # uvicorn's exit status when it cannot start: a taken port, or the app failed (its database, say)
PORT_TAKEN = "address already in use"  # what uvicorn logs (the OSError's message) when the port was taken
RELAUNCHES = 5  # ports tried again after a taken one: free_port's pick can be taken before the server binds it
# What Prefect's own temporary server runs with: no UI, and the server's ephemeral mode.
SERVER_ENVIRONMENT = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerStartError(RuntimeError):
    """The temporary server exited or did not answer in time."""


@dataclass
class TemporaryServer:
    port: int
    process: subprocess.Popen
    errors: object = field(repr=False)  # the server's stderr (a temporary file), read when it fails

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> str:
        """Its API URL once /api/health answers; ServerStartError if it exits (a taken port: launched again) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        relaunches = 0
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == STARTUP_FAILURE and relaunches < RELAUNCHES and PORT_TAKEN in self._stderr().lower():
                relaunches += 1
                self._relaunch()
                continue
            if code is not None:
                raise ServerStartError(f"the server process exited with status {code}: {self._stderr_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return self.api_url
            time.sleep(0.05)
        raise ServerStartError(f"no answer from {self.api_url}/health within {timeout:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _relaunch(self) -> None:
        self.errors.seek(0)
        self.errors.truncate()
        self.port = free_port()
        self.process = _spawn(self.port, self.errors)

    def _stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace").strip()

    def _stderr_tail(self) -> str:
        text = self._stderr()
        return text[-600:] if text else "it printed nothing"


_launched: TemporaryServer | None = None
_lock = threading.Lock()


def launch() -> TemporaryServer:
    """The temporary server of this process: launched now (without waiting for it), or the one launched before."""
    global _launched
    with _lock:
        if _launched is None or _launched.process.poll() not in (None, STARTUP_FAILURE):
            if _launched is not None:  # it exited: its replacement gets a stderr file of its own
                _launched.errors.close()
            errors = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server lives; closed with this process
            port = free_port()
            _launched = TemporaryServer(port, _spawn(port, errors), errors)
            atexit.register(_launched.stop)
        return _launched


def launched() -> TemporaryServer | None:
    return _launched


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(port: int, errors: object) -> subprocess.Popen:
    prefect_root = os.path.dirname(os.path.dirname(util.find_spec("prefect").origin))
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", prefect_root, "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    die_with_parent = None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        die_with_parent = functools.partial(_die_with_parent, os.getpid())
    return subprocess.Popen(
        command,
        env={**os.environ, **SERVER_ENVIRONMENT},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - only sets the parent-death signal before exec
    )


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (and at once if it died already)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
