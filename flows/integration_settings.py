"""The pipeline config's optional integrations, checked with the rest of the config: all off when their section is absent.

    tracking: {mlflow: {tracking_uri: http://mlflow:5000, experiment: spectrum}}   # uri default $MLFLOW_TRACKING_URI
    notify: {webhook: https://hooks.slack.com/services/…, on: [failed, completed], timeout_seconds: 5}
    cost: {price_per_device_hour: 4.5, currency: "$"}                               # or {cuda: 4.5, cpu: 0.05}

The webhook URL is a secret (Slack's carries its token in the path): it is never shown, only
`scheme://host/***`. A tracking URI with credentials in it is refused (MlflowTarget's check): MLflow reads them from
$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, which stay out of every record.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from stages.base.documents import shown
from stages.base.errors import InputError
from stages.store.compute import Prices
from stages.tracking import DEFAULT_EXPERIMENT, MlflowTarget
from stages.tracking.target import TRACKING_URI_ENV

from .config_keys import key_name, suggest

FAILED, COMPLETED = "failed", "completed"
NOTIFY_ON = (FAILED, COMPLETED)
DEFAULT_NOTIFY_TIMEOUT = 5.0
MAX_NOTIFY_TIMEOUT = 60.0  # a receiver never holds a pipeline longer than this
TRACKING_KEYS = ("mlflow",)
MLFLOW_KEYS = ("tracking_uri", "experiment")
NOTIFY_KEYS = ("webhook", "on", "timeout_seconds")
COST_KEYS = ("price_per_device_hour", "currency")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


@dataclass(frozen=True)
class NotifySettings:
    """Where the end of a pipeline run is posted; `webhook` is a secret, kept out of repr (and so of every message)."""

    webhook: str = field(repr=False)
    on: tuple[str, ...] = NOTIFY_ON
    timeout_seconds: float = DEFAULT_NOTIFY_TIMEOUT

    @property
    def shown_webhook(self) -> str:
        return shown_url(self.webhook)


@dataclass(frozen=True)
class CostSettings:
    prices: Prices | None = None
    currency: str = ""


def shown_url(url: str) -> str:
    """A secret URL as messages may show it: scheme://host/*** (no user, port is kept, no path or query); never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unreadable (an unclosed `[`): only its scheme is shown
        scheme = _SCHEME.match(url)
        return f"{scheme.group()[:-1] if scheme else '?'}://?/***"
    port = _port(parts)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{port}' if port else ''}/***"


def _port(parts: SplitResult) -> int | None:
    """The URL's port; None when it names none, or one that is not a number in range (urlsplit raises only when asked)."""
    try:
        return parts.port
    except ValueError:
        return None


def _http_url(url: str) -> bool:
    """`url` is an http(s) URL with a host (and a valid port, if any) that can be read."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _readable_uri(uri: str) -> bool:
    """A URI with a scheme that urlsplit (and so MLflow) can read: not an unclosed `[`."""
    try:
        urlsplit(uri)
    except ValueError:
        return False
    return True


def parse_tracking(value: Any, folder: Path, where: str) -> MlflowTarget | None:
    """Where each pipeline run is logged as an MLflow run (and each stage as a run nested in it)."""
    if value is None:
        return None
    _mapping(value, TRACKING_KEYS, f"{where}: tracking", "mlflow: {tracking_uri: …, experiment: …}")
    mlflow = value.get("mlflow")
    if mlflow is None:
        raise InputError(f"{where}: tracking.mlflow: missing; name the MLflow server (tracking_uri:) or leave tracking: out")
    _mapping(mlflow, MLFLOW_KEYS, f"{where}: tracking.mlflow", "tracking_uri:, experiment:")
    uri, origin = mlflow.get("tracking_uri"), f"{where}: tracking.mlflow.tracking_uri"
    if uri is None:
        uri, origin = os.environ.get(TRACKING_URI_ENV) or None, f"${TRACKING_URI_ENV} (the default of {where}: tracking.mlflow)"
        if uri is None:
            raise InputError(f"{where}: tracking.mlflow.tracking_uri: missing, and ${TRACKING_URI_ENV} is not set; name the MLflow server")
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(f"{origin}: expected a URI (http://host:5000, a folder), found {shown(uri)}")
    if _SCHEME.match(uri) and not _readable_uri(uri):
        raise InputError(f"{origin}: {shown_url(uri)} cannot be read as a URI; name the MLflow server (http://host:5000) or a folder")
    if not _SCHEME.match(uri):  # a local MLflow folder, relative to the config's folder like every path in it
        uri = os.path.abspath(folder / os.path.expanduser(uri))
    experiment = mlflow.get("experiment", DEFAULT_EXPERIMENT)
    if not isinstance(experiment, str) or not experiment.strip():
        raise InputError(f"{where}: tracking.mlflow.experiment: expected an experiment name, found {shown(experiment)}")
    try:
        return MlflowTarget(uri, experiment.strip())
    except InputError as exc:  # the target's own check, the one left once the URI and experiment are known non-empty: credentials
        raise InputError(f"{origin}: {shown_url(uri)} carries credentials: {exc}") from None


def parse_notify(value: Any, where: str) -> NotifySettings | None:
    if value is None:
        return None
    _mapping(value, NOTIFY_KEYS, f"{where}: notify", "webhook:, on:, timeout_seconds:", secret=True)
    webhook = value.get("webhook")
    if not isinstance(webhook, str) or not webhook.strip():
        raise InputError(f"{where}: notify.webhook: missing; name the URL to post to (http or https), or leave notify: out")
    if not _http_url(webhook.strip()):
        raise InputError(f"{where}: notify.webhook: {shown_url(webhook)} is not an http(s) URL with a host; name the URL to post to")
    on = value.get("on", list(NOTIFY_ON))
    on = [on] if isinstance(on, str) else on
    if not isinstance(on, list) or not on:
        raise InputError(f"{where}: notify.on: expected a list of {' and/or '.join(NOTIFY_ON)}, found {shown(on)}")
    for item in on:
        if item not in NOTIFY_ON:
            raise InputError(f"{where}: notify.on: {shown(item)} is not one of {', '.join(NOTIFY_ON)}")
    timeout = value.get("timeout_seconds", DEFAULT_NOTIFY_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_NOTIFY_TIMEOUT:
        raise InputError(f"{where}: notify.timeout_seconds: expected seconds in (0, {MAX_NOTIFY_TIMEOUT:g}], found {shown(timeout)}")
    return NotifySettings(webhook.strip(), tuple(dict.fromkeys(on)), float(timeout))


def parse_cost(value: Any, where: str) -> CostSettings | None:
    if value is None:
        return None
    _mapping(value, COST_KEYS, f"{where}: cost", "price_per_device_hour:, currency:")
    currency = value.get("currency", "")
    if not isinstance(currency, str) or len(currency) > 8:
        raise InputError(f"{where}: cost.currency: expected a short currency mark ($, EUR …), found {shown(currency)}")
    return CostSettings(Prices.parse(value.get("price_per_device_hour"), f"{where}: cost.price_per_device_hour"), currency)


def _mapping(value: Any, keys: tuple[str, ...], where: str, example: str, secret: bool = False) -> None:
    """`value` is a mapping of known keys; else an error naming the key (with a suggestion). A `secret` value is not shown."""
    if not isinstance(value, dict):
        found = type(value).__name__ if secret else shown(value, 60)
        raise InputError(f"{where}: expected a mapping ({example}), found {found}")
    for key in value:
        if key not in keys:
            raise InputError(f"{where}.{key_name(key)}: not a setting{suggest(key, keys)}; the settings are {', '.join(keys)}")
