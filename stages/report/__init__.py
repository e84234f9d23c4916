"""`spectrum report`: a run (or a comparison) as one self-contained HTML page, with a Markdown file beside it.

    result = build_report(store, "20260101T120000Z-1a2b3c4d", Path("report.html"))

Everything is read from the artifact store: the run's stages and the runs its inputs came from
(build.py), drawn with matplotlib (charts.py) and written as HTML and Markdown (render.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.errors import InputError
from ..base.files import ensure_writable, write_atomic
from ..store import ArtifactStore
from ..store.compute import Prices
from .build import ReportData, gather
from .render import compose, to_html, to_markdown

HTML_SUFFIXES = (".html", ".htm")


@dataclass(frozen=True)
class ReportResult:
    html_path: Path
    markdown_path: Path
    sections: tuple[str, ...]  # ids of the sections that had data: snr, training, evaluation, comparison, drift, compute, lineage
    images: int  # charts embedded in the HTML


def report_paths(out: Path) -> tuple[Path, Path]:
    """The HTML file and the Markdown file beside it (report.html -> report.md)."""
    out = Path(out)
    if out.suffix.lower() not in HTML_SUFFIXES:
        raise InputError(f"the report {out} must be an .html file (the Markdown is written beside it, with .md)")
    return out, out.with_suffix(".md")


def build_report(
    store: ArtifactStore, run_id: str, out: Path, *, overwrite: bool = False, prices: Prices | None = None, currency: str = ""
) -> ReportResult:
    """Write the report of `run_id` to `out` (HTML) and `out` with `.md` (Markdown); with `prices`, the compute's cost.

    InputError when the output cannot be written (checked first) or the run has nothing to report;
    OutputExistsError when a file exists and `overwrite` is off.
    """
    html_path, markdown_path = report_paths(out)
    for path in (html_path, markdown_path):
        ensure_writable(path, overwrite)
    data = gather(store, run_id)
    data.prices, data.currency = prices, currency
    document = compose(data)
    try:
        write_atomic(markdown_path, to_markdown(document, html_path.name).encode("utf-8"), overwrite=overwrite)
        write_atomic(html_path, to_html(document).encode("utf-8"), overwrite=overwrite)
    except OSError as exc:
        raise InputError(f"the report cannot be written to {html_path.parent}: {exc.strerror or exc}") from exc
    sections = tuple(section.id for section in document.sections if section.has_data)
    return ReportResult(html_path, markdown_path, sections, document.images)


__all__ = ["ReportData", "ReportResult", "build_report", "gather", "report_paths"]
