"""The end of a pipeline run, posted to a webhook (`notify:` in the pipeline config) as one JSON summary.

The body is Slack-compatible (`text`, one line per fact) with the same facts as fields: run_id,
status (completed or failed), the stages run and reused, the wall time, the evaluation's headline
numbers (base, trained and delta of each dataset's metrics), GPU-hours, device-hours and cost, and
where the report is; on failure the step that failed and its one-line error (scrubbed, clipped).

Why not Prefect's own mechanism: a flow's `on_completion`/`on_failure` state hooks fire only for
`pipeline_flow`, while `run_pipeline` also runs without it (the watcher, `run_pipeline` from code),
and they see a flow state, not the run's result; automations and notification blocks run in the
Prefect server's event services, which the embedded default's temporary server does not outlive,
and a block stores the webhook URL (a secret: Slack's carries its token) in Prefect's database.
So `run_pipeline` posts once per run, however it was started, from its own process: after the
run's lease is released and before its outcome (result or exception) reaches the caller.

A receiver that is down, refuses or answers slowly never fails the run or holds it longer than
`timeout_seconds`: the post runs in a daemon thread that the run waits for at most that long,
then one warning. The URL is never logged or returned: at most `scheme://host/***`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stages.base.contracts import EVALUATE, EVALUATION_JSON_FILE
from stages.base.documents import clip
from stages.base.errors import SpectrumError
from stages.store import ArtifactStore, Manifest, read_output
from stages.store.compute import Usage, describe_usage, reused_compute, usage

from .integration_settings import COMPLETED, FAILED, CostSettings, NotifySettings
from .prefect_api import scrub

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 500
MAX_HEADLINES = 12  # datasets x metrics a message lists


@dataclass
class RunEnd:
    """What a finished (or failed) pipeline run tells its receiver."""

    run_id: str
    status: str  # completed | failed
    store: str
    wall_seconds: float
    stages_run: list[str] = field(default_factory=list)
    stages_reused: list[str] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    gpu_hours: float = 0.0
    device_hours: dict[str, float] = field(default_factory=dict)
    cost: float | None = None
    currency: str = ""
    usage: str = ""
    report: str | None = None
    failed_step: str | None = None
    error: str | None = None

    def payload(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {"text": self.text(), **fields}

    def text(self) -> str:
        """The Slack message: the outcome first, then one fact per line."""
        head = f"Spectrum pipeline run {self.run_id} {self.status}"
        if self.status == FAILED:
            head += f" at {self.failed_step or 'start'}: {self.error}"
        lines = [head, f"stages run: {', '.join(self.stages_run) or 'none'}; reused: {', '.join(self.stages_reused) or 'none'}"]
        lines.append(f"wall time {self.wall_seconds:.0f} s; {self.usage}")
        for entry in self.evaluation:
            delta = entry.get("delta")
            change = f" ({delta:+.4g})" if isinstance(delta, (int, float)) else ""
            lines.append(f"{entry['metric']} on {entry['dataset']}: {_g(entry.get('base'))} -> {_g(entry.get('trained'))}{change}")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def run_end(
    run_id: str,
    store: ArtifactStore,
    manifests: Mapping[str, Manifest],
    ran: list[str],
    cached: list[str],
    wall_seconds: float,
    cost: CostSettings | None,
    report: str | None = None,
    failure: BaseException | None = None,
    failed_step: str | None = None,
) -> RunEnd:
    """The summary of a run from what it committed (`manifests`) and how it ended; reading the evaluation never raises."""
    use = run_usage(run_id, manifests, cost)
    currency = cost.currency if cost else ""
    return RunEnd(
        run_id=run_id,
        status=FAILED if failure is not None else COMPLETED,
        store=scrub(store.root_uri),
        wall_seconds=round(wall_seconds, 1),
        stages_run=[s for s in ran if s not in cached],
        stages_reused=[s for s in ran if s in cached],
        evaluation=headlines(store, manifests.get(EVALUATE)),
        gpu_hours=round(use.gpu_hours, 6),
        device_hours={kind: round(hours, 6) for kind, hours in use.device_hours.items()},
        cost=None if use.cost is None else round(use.cost, 6),
        currency=currency,
        usage=describe_usage(use, currency),
        report=report,
        failed_step=failed_step if failure is not None else None,
        error=None if failure is None else one_line_error(failure),
    )


def failed_start(run_id: str, store_uri: str, wall_seconds: float, cost: CostSettings | None, failure: BaseException) -> RunEnd:
    """The end of a run that failed before it held its lease (store unreachable, run held by another pipeline): nothing ran."""
    use, currency = run_usage(run_id, {}, cost), cost.currency if cost else ""
    return RunEnd(
        run_id=run_id,
        status=FAILED,
        store=scrub(store_uri),
        wall_seconds=round(wall_seconds, 1),
        cost=None if use.cost is None else 0.0,
        currency=currency,
        usage=describe_usage(use, currency),
        failed_step="start",
        error=one_line_error(failure),
    )


def run_usage(run_id: str, manifests: Mapping[str, Manifest], cost: CostSettings | None) -> Usage:
    """The device time this run spent: a step whose manifest is another run's (reused, pinned) cost it nothing."""
    computes = [m.compute if m.run_id == run_id else reused_compute(m.compute) for m in manifests.values()]
    return usage(computes, cost.prices if cost else None)


def describe_run_usage(run_id: str, manifests: Mapping[str, Manifest], cost: CostSettings | None) -> str:
    """`0.0000 GPU-h, 0.0023 CPU-h, cost $0.01`: what the run spent, as the CLI and the message show it."""
    return describe_usage(run_usage(run_id, manifests, cost), cost.currency if cost else "")


def one_line_error(exc: BaseException) -> str:
    """What went wrong, on one scrubbed, clipped line (an interrupt says so)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGTERM or Ctrl-C)"
    text = str(exc) if isinstance(exc, SpectrumError) else f"{type(exc).__name__}: {exc}"
    return clip(scrub(text), MAX_ERROR_CHARS)


def headlines(store: ArtifactStore, manifest: Manifest | None) -> list[dict[str, Any]]:
    """Base, trained and delta of each dataset's metrics (per-token NLL left out: perplexity says it), from evaluation.json."""
    if manifest is None:
        return []
    try:
        summary = json.loads(read_output(store, manifest, EVALUATION_JSON_FILE)[0])
    except Exception as exc:  # noqa: BLE001 - the message goes out without the numbers rather than not at all
        log.warning("the evaluation of run %s could not be read for the notification (%s)", manifest.run_id, clip(scrub(str(exc)), 200))
        return []
    found = []
    for entry in summary.get("metrics", []):
        if entry.get("metric") == "nll_per_token":
            continue
        base, trained = entry.get("base"), entry.get("trained")
        delta = trained - base if isinstance(base, (int, float)) and isinstance(trained, (int, float)) else None
        found.append({"dataset": entry.get("dataset"), "metric": entry.get("metric"), "base": base, "trained": trained, "delta": delta})
    return found[:MAX_HEADLINES]


def notify(settings: NotifySettings | None, end: RunEnd) -> bool:
    """Post `end` when the settings ask for its status; True if the receiver accepted it. Never raises, never waits past the timeout."""
    if settings is None or end.status not in settings.on:
        return False
    outcome: dict[str, Any] = {}
    body = json.dumps(end.payload(), default=str).encode()
    sender = threading.Thread(target=_post, args=(settings, body, outcome), name="spectrum-notify", daemon=True)
    sender.start()
    sender.join(settings.timeout_seconds + 0.5)  # httpx's timeout is per phase; this bounds the whole post
    if sender.is_alive():
        outcome.setdefault("error", f"no answer within {settings.timeout_seconds:g} s")
    if "status" in outcome and outcome["status"] < 300:
        return True
    why = outcome.get("error") or f"HTTP {outcome.get('status')}"
    where = settings.shown_webhook
    log.warning("the notification of run %s (%s) did not reach %s (%s); the run is not affected", end.run_id, end.status, where, why)
    return False


class _HideWebhooks(logging.Filter):
    """httpx logs each request's full URL (at INFO): a webhook's is shown as scheme://host/*** instead."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = message
        for url, shown in self.urls.items():
            hidden = hidden.replace(url, shown)
        if hidden != message:
            record.msg, record.args = hidden, ()
        return True


_HIDE = _HideWebhooks()


def _post(settings: NotifySettings, body: bytes, outcome: dict[str, Any]) -> None:
    """One POST; its outcome (HTTP status or a scrubbed error without the URL) in `outcome`."""
    import httpx

    forms = _written_forms(settings.webhook)
    for form in forms:
        _HIDE.urls[form] = settings.shown_webhook
    if _HIDE not in logging.getLogger("httpx").filters:
        logging.getLogger("httpx").addFilter(_HIDE)
    try:
        with httpx.Client(timeout=settings.timeout_seconds, follow_redirects=False) as client:
            response = client.post(settings.webhook, content=body, headers={"Content-Type": "application/json"})
        outcome["status"] = response.status_code
    except Exception as exc:  # noqa: BLE001 - a receiver's failure is reported as a warning, never raised
        outcome["error"] = type(exc).__name__ + _detail(exc, forms)


def _written_forms(webhook: str) -> list[str]:
    """The webhook as configured and as httpx writes it in its logs and errors (host lower-cased, default port dropped,
    percent-encoded): each is hidden. The longer first, so that neither is left half-replaced."""
    import httpx

    try:
        normalised = str(httpx.URL(webhook))
    except Exception:  # noqa: BLE001 - a URL httpx cannot read is not posted either: its error is hidden by the written form
        normalised = webhook
    return sorted({webhook, normalised}, key=len, reverse=True)


def _detail(exc: Exception, forms: list[str]) -> str:
    """The exception's message unless it names the URL or a part of its path (httpx's messages may)."""
    text = str(exc)
    named = any(form in text or any(part and part in text for part in form.split("/")[3:]) for form in forms)
    return "" if not text or named else f": {clip(scrub(text), 200)}"


def _g(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"
