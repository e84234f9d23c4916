"""The boundary between the pipeline and Prefect: the API is up before anything is claimed, and no secret crosses.

- `start_prefect()` makes sure a Prefect API answers before a watcher claims a drop or a pipeline
  leases its run: the configured server ($PREFECT_API_URL) is checked, or the temporary server
  (flows.prefect_server, launched early by `launch_temporary_server`) is waited for, with a
  start-up timeout sized for a loaded machine. The temporary server is tied to this process
  (Linux: PR_SET_PDEATHSIG), so a pipeline killed with kill -9 does not leave its server running.
- Everything Prefect stores or shows (state messages, tracebacks, log lines) goes through
  `scrub`: credentials in URLs and the values of secret-named environment variables become
  `***`. Exceptions leaving a flow or task are replaced by a scrubbed copy (`redacted`), and a
  logging filter scrubs every record Prefect's handlers emit (its own tracebacks included).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from stages.base.documents import clip
from stages.base.errors import SpectrumError
from stages.store.scrub import looks_secret_name, redact

from . import prefect_server

STARTUP_SECONDS = 300  # Prefect's default (20 s) is too short for a 2-core machine starting three watchers at once
_MIN_ENV_SECRET = 8
F = TypeVar("F", bound=Callable[..., Any])


class PrefectUnavailableError(SpectrumError):
    """No Prefect API could be reached or started: nothing was claimed or run."""


def scrub(text: str) -> str:
    """`text` with URL credentials and the values of secret-named environment variables (AWS_SECRET_ACCESS_KEY, …) as ***."""
    text = redact(text)
    for name, value in os.environ.items():
        if len(value) >= _MIN_ENV_SECRET and looks_secret_name(name) and value in text:
            text = text.replace(value, "***")
    return text


def scrubbed(exc: BaseException) -> BaseException:
    """`exc` if nothing in it (message, causes) is secret; else a copy of the same class with a scrubbed message and no cause."""
    full = "".join(traceback.format_exception(exc))
    if scrub(full) == full:
        return exc
    clean = scrub(str(exc))
    try:
        copy = type(exc).__new__(type(exc))
        copy.args = (clean,)
        copy.__dict__.update({k: scrub(v) if isinstance(v, str) else v for k, v in vars(exc).items()})
        if scrub(str(copy)) != str(copy):  # a class whose message is not its args
            raise TypeError("message not from args")
    except Exception:  # noqa: BLE001 - a class that cannot be copied this way: keep the message, lose the type
        copy = RuntimeError(f"{type(exc).__name__}: {clean}")
    return copy


def redacted(function: F) -> F:
    """Decorate a flow or task body: an exception that carries a secret leaves it scrubbed (Prefect stores its message)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            clean = scrubbed(exc)
            if clean is exc:
                raise
            raise clean.with_traceback(exc.__traceback__) from None

    return wrapper  # type: ignore[return-value]


class _ScrubFilter(logging.Filter):
    """Scrubs a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text, record.exc_info = scrub(text), None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


_FILTER = _ScrubFilter()


def install_scrubbing() -> None:
    """Put the scrub filter on every logging handler configured now (Prefect's console and API handlers among them)."""
    loggers = [logging.getLogger(), *(item for item in logging.root.manager.loggerDict.values() if isinstance(item, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def launch_temporary_server() -> None:
    """Launch the temporary server now, without waiting for it, unless $PREFECT_API_URL names a server.

    A command calls this first, so that the server boots while it imports Prefect and the pipeline;
    `start_prefect` then waits for it (or stops it, when a Prefect profile names a server).
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    if "prefect" in sys.modules:  # imported already: its settings (a profile, a test harness) may name a server
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return
    prefect_server.launch()


def start_prefect() -> str:
    """The URL of a Prefect API that answers: the configured one, checked, or the temporary server, started now."""
    import prefect  # noqa: F401 - configures Prefect's logging, which install_scrubbing then covers
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    install_scrubbing()
    url = PREFECT_API_URL.value()
    launched = prefect_server.launched()
    if url and (launched is None or url != launched.api_url):
        if launched is not None:  # a profile names a server: the temporary one launched early is not needed
            launched.stop()
        from prefect import get_client

        with get_client(sync_client=True) as client:
            failure = client.api_healthcheck()
        if failure is not None:
            raise PrefectUnavailableError(
                f"the Prefect API at {scrub(url)} does not answer ({clip(scrub(str(failure)))}); nothing was claimed or run: "
                "start the server or correct $PREFECT_API_URL"
            )
        return url
    timeout = max(int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()), STARTUP_SECONDS)
    try:
        url = prefect_server.launch().wait(timeout)
    except prefect_server.ServerStartError as exc:
        raise PrefectUnavailableError(
            f"the temporary Prefect server did not start within {timeout} s ({clip(scrub(str(exc)))}); nothing was claimed or run: "
            "run again, raise $PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set $PREFECT_API_URL to a running server"
        ) from None
    # Prefect (here, and in any process this one starts) reaches the server through the setting, as it would a configured one.
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    return url
