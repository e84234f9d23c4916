"""The report as a document (sections of text, tables and charts), written as self-contained HTML and as Markdown.

`compose` turns the gathered data into sections; `to_html` embeds every chart as a data URI and its
CSS in a <style> tag (a Content-Security-Policy forbids any other request); `to_markdown` writes the
same text and tables for a terminal or a pull request, pointing to the HTML for the charts.

Text from data (tensor and module names, run ids, labels, paths) is escaped in both: HTML-escaped
in the page, and in the Markdown escaped as Markdown (`_md`) so a name like `<img src=x>` or
`*bold*` is shown as it is, never rendered; the charts draw it literally too (charts.literal).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from .. import compare_stats
from ..store.compute import CPU, CUDA, describe_usage, usage
from . import charts
from .build import Evaluation, ReportData, Selection

TEXT, NUM, MONO, CODE, WIDE, NOWRAP = "text", "num", "mono", "code", "wide", "nowrap"  # code: mono, unwrapped; wide: mono, roomy
MAX_CURVES = 8
MAX_COLUMNS = 40  # module types on the SNR map before expert numbers are folded into one column
MAX_INPUTS = 3  # inputs listed per stage in the lineage table (largest first)
METRIC_ORDER = ("perplexity", "nll_per_token", "sft_eval_loss")
ROLE_ORDER = ("domain", "general", "chat", "task")  # the evaluation table's dataset roles, in reading order
DATASET_NAMES = {"heldout": "held-out", "general": "general", "python-docs": "Python docs", "chat-heldout": "held-out chats"}


@dataclass(frozen=True)
class Text:
    text: str
    missing: bool = False  # the one line a section without data shows


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]  # cells are text; "\n" breaks a line
    kinds: list[str]  # per column: text, num (right-aligned figures), mono (names and digests, wrapped), code, wide, nowrap

    @property
    def numeric(self) -> list[bool]:
        return [kind == NUM for kind in self.kinds]


@dataclass(frozen=True)
class Image:
    png: bytes
    alt: str


Block = Text | Table | Image


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return not any(isinstance(b, Text) and b.missing for b in self.blocks)


@dataclass
class Document:
    run_id: str
    summary: list[str]
    meta: list[str]
    sections: list[Section]

    @property
    def images(self) -> int:
        return sum(isinstance(b, Image) for s in self.sections for b in s.blocks)


def compose(data: ReportData) -> Document:
    """The report's sections, in reading order."""
    sections = [_snr(data), _training(data), _evaluation(data), _comparison(data), _drift(data), _compute(data), _lineage(data)]
    versions = sorted({node.manifest.code_version for node in data.stages})
    meta = [f"store {data.store_uri}", f"code version {', '.join(versions)}", f"generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"]
    return Document(data.run_id, _summary(data), meta, sections)


# --- sections ----------------------------------------------------------------------------------------


def _summary(data: ReportData) -> list[str]:
    facts = [f"model {data.model}"] if data.model else []
    if data.comparison and _seeded(data.comparison):
        summary = compare_stats.summarize(data.comparison)
        seeds = max(len(entry["seeds"]) for entry in summary)
        facts.append(f"{len(summary)} methods compared over {seeds} seeds: {', '.join(str(entry['method']) for entry in summary)}")
        found = compare_stats.significant(summary)
        facts += found or [f"no paired difference to {compare_stats.BASELINE} excludes 0 at 95%"]
        return facts
    if data.comparison:
        facts.append(f"{len(data.comparison)} methods compared: {', '.join(str(r.get('method')) for r in data.comparison)}")
        for r in data.comparison:
            ratios = [
                f"{what} {_times(r.get(column))}"
                for what, column in (("time", "time_ratio"), ("memory", "memory_ratio"))
                if _finite(r.get(column))
            ]
            if r.get("method") != "full" and ratios:
                facts.append(f"{r.get('method')}: {', '.join(ratios)} of full")
        return facts
    share = _share(data)
    if share:
        facts.append(f"trainable share {_share_text(share)}")
    if len(data.evaluations) == 1:
        for row in _metric_rows(data.evaluations[0]):
            if row["metric"] != "nll_per_token" and row["base"] is not None and row["trained"] is not None:
                change = f" ({_signed_percent(row['relative'])})" if row["relative"] is not None else ""
                facts.append(f"{_dataset(row['dataset'])} {row['metric']} {_number(row['base'])} → {_number(row['trained'])}{change}")
    return facts


def _snr(data: ReportData) -> Section:
    section = Section("snr", "SNR map and selection")
    if not data.snr and not data.selections:
        section.blocks.append(Text("No SNR scan or layer selection in this run or the runs it builds on.", missing=True))
        return section
    scanned = data.snr or next((s.snr for s in data.selections if s.snr), None)
    if scanned:
        source = f" (scan {'/'.join(data.snr_key)})" if data.snr and data.snr_key else ""
        section.blocks.append(
            Text(
                f"Signal-to-noise ratio of every weight matrix of the base model{source}. A red outline marks a selected "
                "tensor; a white dot a tensor whose bytes changed in training."
            )
        )
        if len({r.get("module_type") for r in scanned}) > MAX_COLUMNS:
            section.blocks.append(
                Text("Expert numbers are folded (shown as *): a cell shows the best SNR of its experts, outlined or dotted when any is.")
            )
        for selection in data.selections or [None]:
            section.blocks.append(Image(_heatmap(data, selection), f"SNR map{_for(selection, data)}"))
    else:
        section.blocks.append(Text("No SNR table in this run or its lineage, so no map; the selection follows."))
    if data.selections:
        section.blocks.append(_selection_table(data))
        for selection in data.selections:
            share = _selection_share(data, selection)
            if share:
                section.blocks.append(Text(f"Trainable share of the model{_for(selection, data)}: {_share_text(share)}."))
    return section


def _heatmap(data: ReportData, selection: Selection | None) -> bytes:
    """The map of the scan the selection chose from (the base model's scan when the report lacks it)."""
    chosen = {r["tensor_name"] for r in selection.rows if r.get("selected")} if selection else set()
    changed = (selection.changed if selection else data.changed) or set()
    rows, scan = (selection.snr, selection.snr_key) if selection and selection.snr else (data.snr or [], data.snr_key)
    kind = _type_namer(str(r.get("module_type")) for r in rows)
    cells = [
        charts.HeatCell(
            r.get("layer_index"), kind(r.get("module_type")), float(r["snr"]), r["tensor_name"] in chosen, r["tensor_name"] in changed
        )
        for r in rows
    ]
    trained = (selection.changed if selection else data.changed) is not None
    other = f" (scan {'/'.join(scan)})" if scan and scan != data.snr_key else ""
    title = f"SNR per layer and module type{_for(selection, data)}{other}"
    return charts.snr_heatmap(cells, title, show_changed=trained)


def _type_namer(types: Iterable[str]):
    """Module type -> its column: itself, or with expert numbers folded (`mlp.experts.*.up_proj`) when there are too many."""
    if len(set(types)) <= MAX_COLUMNS:
        return lambda name: str(name)
    return lambda name: ".".join("*" if part.isdigit() else part for part in str(name).split("."))


def _type_order(data: ReportData) -> list[str]:
    """Module types as the map shows them: those within layers first, then embeddings and head."""
    rows = data.snr or []
    return list(
        dict.fromkeys(
            [str(r.get("module_type")) for r in rows if r.get("layer_index") is not None] + [str(r.get("module_type")) for r in rows]
        )
    )


def _selection_table(data: ReportData) -> Table:
    selections = data.selections
    kind = _type_namer(str(r.get("module_type")) for s in selections for r in s.rows)
    known = [kind(t) for t in _type_order(data)]
    found = [kind(r.get("module_type")) for s in selections for r in s.rows if _candidate(r)]
    types = [t for t in dict.fromkeys(known + found) if t in set(found)]
    headers = [
        "module type",
        *(f"{s.label}: selected / candidates" if len(selections) > 1 else "selected / candidates" for s in selections),
    ]
    rows = []
    for module_type in types:
        cells = [module_type]
        for selection in selections:
            group = [r for r in selection.rows if kind(r.get("module_type")) == module_type and _candidate(r)]
            cells.append(f"{sum(bool(r.get('selected')) for r in group)} / {len(group)}")
        rows.append(cells)
    if len(selections) == 1:
        headers += ["selected parameters", "lowest selected SNR", "best SNR"]
        for cells, module_type in zip(rows, types, strict=True):
            group = [r for r in selections[0].rows if kind(r.get("module_type")) == module_type and _candidate(r)]
            picked = [r for r in group if r.get("selected")]
            snrs = [r["snr"] for r in picked if _finite(r.get("snr"))]
            cells += [
                f"{sum(r.get('parameter_count') or 0 for r in picked):,}",
                _number(min(snrs)) if snrs else "—",
                _number(max((r["snr"] for r in group if _finite(r.get("snr"))), default=None)),
            ]
    return Table(headers, rows, [CODE, *([NUM] * (len(headers) - 1))])


def _training(data: ReportData) -> Section:
    section = Section("training", "Training")
    if not data.trainings:
        section.blocks.append(Text("No training in this run or the runs it builds on.", missing=True))
        return section
    shown = data.trainings[:MAX_CURVES]
    curves = [
        charts.Curve(
            t.label, [int(r["step"]) for r in t.metrics], [r.get("loss") for r in t.metrics], [r.get("learning_rate") for r in t.metrics]
        )
        for t in shown
    ]
    if len(data.trainings) > len(shown):
        section.blocks.append(Text(f"The chart shows the first {len(shown)} of {len(data.trainings)} trainings."))
    section.blocks.append(Image(charts.loss_curves(curves), "training loss and learning rate per step"))
    headers = ["training", "steps", "final loss", "s / step", "tokens / s", "peak memory (MiB)", "trainable share", "changed tensors"]
    rows = []
    for t in data.trainings:
        final = next((r.get("loss") for r in reversed(t.metrics) if r.get("loss") is not None), None)
        share = t.share
        changed = t.changed
        rows.append(
            [
                t.label,
                f"{len(t.metrics):,}",
                _number(final),
                _number(_mean(r.get("step_seconds") for r in t.metrics)),
                _number(_mean(r.get("tokens_per_second") for r in t.metrics)),
                _number(_max(r.get("peak_memory_bytes") for r in t.metrics), scale=1 / 2**20),
                _percent(share[0] / share[1]) if share else "—",
                f"{len(changed):,} of {len(t.tensors or []):,}" if changed is not None else "—",
            ]
        )
    section.blocks.append(Table(headers, rows, [TEXT, *([NUM] * 7)]))
    return section


def _evaluation(data: ReportData) -> Section:
    section = Section("evaluation", "Evaluation")
    if not data.evaluations:
        section.blocks.append(Text("No evaluation in this run or the runs it builds on.", missing=True))
        return section
    several = len(data.evaluations) > 1
    headers = [*(["evaluation"] if several else []), "metric", "dataset", "base", "trained", "delta", "relative change", "tokens"]
    rows = []
    for evaluation in data.evaluations:
        for row in _metric_rows(evaluation):
            if several and row["metric"] == "nll_per_token":
                continue  # perplexity says the same; the table stays short
            rows.append(
                [
                    *([evaluation.label] if several else []),
                    row["metric"],
                    _dataset(row["dataset"]),
                    _number(row["base"]),
                    _number(row["trained"]),
                    _signed(row["delta"]),
                    _signed_percent(row["relative"]),
                    f"{row['tokens']:,}" if row["tokens"] is not None else "—",
                ]
            )
    text = (
        "Perplexity and losses: lower is better (lm-evaluation-harness scores such as lm_eval:acc: higher is better). "
        "Delta = trained − base; relative change = delta / base."
    )
    section.blocks += [Text(text), Table(headers, rows, [TEXT] * (len(headers) - 5) + [NUM] * 5)]
    return section


def _comparison(data: ReportData) -> Section:
    section = Section("comparison", "Method comparison")
    if not data.comparison:
        section.blocks.append(Text("Not a comparison: no comparison table in this run or the runs it builds on.", missing=True))
        return section
    seeded = _seeded(data.comparison)
    headers = [
        "method",
        *(["seed"] if seeded else []),
        "trainable share",
        "s / step (vs full)",
        "peak memory MiB (vs full)",
        "final loss",
        "held-out perplexity",
        "general perplexity",
        "training (s)",
    ]
    rows = [
        [
            str(r.get("method")),
            *([str(r.get("seed"))] if seeded else []),
            _percent(r.get("trainable_share")),
            _with_ratio(r.get("step_seconds"), r.get("time_ratio")),
            _with_ratio(r.get("peak_memory_mib"), r.get("memory_ratio")),
            _number(r.get("final_loss")),
            _before_after(r.get("heldout_perplexity_base"), r.get("heldout_perplexity")),
            _before_after(r.get("general_perplexity_base"), r.get("general_perplexity")),
            _number(r.get("train_seconds")),
        ]
        for r in data.comparison
    ]
    text = "Every method trained the same model on the same data for the same steps; ratios are to full fine-tuning."
    if not seeded:
        section.blocks += [
            Text(text),
            Table(headers, rows, [CODE, *([NUM] * 7)]),
            Image(charts.comparison_bars(data.comparison), "time per step, peak memory and perplexity per method"),
        ]
        return section
    summary = compare_stats.summarize(data.comparison)
    section.blocks += [
        Text(f"{text} Each method ran once per training seed (the data order; the random arm's draw)."),
        *_seed_tables(summary),
    ]
    section.blocks += [
        Text("Every run, one row per method and seed:"),
        Table(headers, rows, [CODE, *([NUM] * 8)]),
        Image(
            charts.comparison_bars(data.comparison, summary),
            f"mean ± sd over seeds of time per step, peak memory and perplexity per method, and the paired 95% intervals to "
            f"{compare_stats.BASELINE}",
        ),
    ]
    return section


def _seeded(comparison: list[dict[str, Any]]) -> bool:
    """A comparison over more than one seed (a table from before seeds has none: one seed)."""
    return len({r.get("seed") for r in comparison}) > 1


def _seed_tables(summary: list[dict[str, Any]]) -> list[Block]:
    """Mean ± sd per method, and the paired differences to the baseline with their 95% t-intervals."""
    header, spreads = compare_stats.spread_table(summary)
    blocks: list[Block] = [Text("Mean ± standard deviation over the seeds:"), Table(header, spreads, [CODE] + [NUM] * (len(header) - 1))]
    base = compare_stats.BASELINE
    differences = compare_stats.difference_table(summary)
    if differences is None:
        return [*blocks, Text(f"No paired differences: {base} is not among the methods.")]
    header, rows = differences
    explained = (
        f"Difference to {base} (method − {base}, paired by seed): mean [95% t-interval]; * marks an interval that excludes 0, "
        "a difference significant at 95% for that interval alone (no correction for the many intervals tested). Lower is better for each."
    )
    return [*blocks, Text(explained), Table(header, rows, [CODE] + [NUM] * (len(header) - 1))]


def _drift(data: ReportData) -> Section:
    section = Section("drift", "SNR drift")
    drifting = [e for e in data.evaluations if e.drift]
    if not drifting:
        section.blocks.append(Text("No SNR drift: no evaluation here rescanned the models (evaluate --snr-drift).", missing=True))
        return section
    panels = [
        charts.DriftPanel(
            e.label, [r["snr_before"] for r in e.drift], [r["snr_after"] for r in e.drift], [bool(r["changed"]) for r in e.drift]
        )
        for e in drifting
        if e.drift
    ]
    section.blocks.append(Text("Each matrix's SNR in the base model against the trained one; a frozen tensor must sit on the diagonal."))
    section.blocks.append(Image(charts.drift_scatter(panels), "SNR before vs after training"))
    headers = [
        *(["evaluation"] if len(drifting) > 1 else []),
        "matrices",
        "changed",
        "frozen",
        "frozen off the diagonal",
        "mean relative SNR change (changed)",
    ]
    rows = []
    for e in drifting:
        drift = e.drift or []
        changed = [r for r in drift if r["changed"]]
        frozen = [r for r in drift if not r["changed"]]
        moved = sum(1 for r in frozen if not _same(r["snr_before"], r["snr_after"]))
        relative = _mean(r.get("relative_snr_change") for r in changed)
        rows.append(
            [
                *([e.label] if len(drifting) > 1 else []),
                f"{len(drift):,}",
                f"{len(changed):,}",
                f"{len(frozen):,}",
                f"{moved:,}",
                _signed_percent(relative),
            ]
        )
    section.blocks.append(Table(headers, rows, [TEXT] * (len(headers) - 5) + [NUM] * 5))
    return section


def _compute(data: ReportData) -> Section:
    """GPU-hours (and CPU-hours) per stage from the manifests, the run's own and with the earlier runs it builds on."""
    section = Section("compute", "Compute")
    nodes = [node for node in data.stages if node.manifest.compute is not None]
    if not nodes:
        section.blocks.append(Text("No compute recorded: these stages were committed before manifests recorded device time.", True))
        return section
    own = usage([n.manifest.compute for n in data.stages if data.own(n.key)], data.prices)
    everything = usage([n.manifest.compute for n in data.stages], data.prices)
    section.blocks.append(Text(f"Run {data.run_id}: {describe_usage(own, data.currency)}."))
    if any(not data.own(node.key) for node in data.stages):
        section.blocks.append(Text(f"With the earlier runs it builds on: {describe_usage(everything, data.currency)}."))
    if everything.unpriced:
        unpriced = ", ".join(everything.unpriced)
        section.blocks.append(Text(f"The cost counts {unpriced} time at 0: no price per device-hour was given for it."))
    headers = ["run", "stage", "device", "seconds", "GPU-h", "CPU-h"] + (["cost"] if data.prices is not None else [])
    rows = [_compute_row(data, node.manifest) for node in data.stages]
    section.blocks.append(Table(headers, rows, [MONO, MONO, TEXT] + [NUM] * (len(headers) - 3)))
    return section


def _compute_row(data: ReportData, manifest: Any) -> list[str]:
    compute = manifest.compute
    if compute is None:
        return [manifest.run_id, manifest.stage, "not recorded", "—", "—", "—"] + (["—"] if data.prices is not None else [])
    use = usage([compute], data.prices)
    device = f"{compute.get('device_count', 1)} × {compute.get('device_name') or compute['device']}"
    row = [manifest.run_id, manifest.stage, device, f"{float(compute['seconds']):,.1f}"]
    row += [f"{use.device_hours.get(kind, 0.0):.4f}" for kind in (CUDA, CPU)]
    if data.prices is not None:
        row.append("—" if use.cost is None else f"{data.currency}{use.cost:,.2f}")
    return row


def _lineage(data: ReportData) -> Section:
    section = Section("lineage", "Lineage")
    section.blocks.append(
        Text(
            f"The stages of run {data.run_id} and, below them, the stages of earlier runs that produced their inputs; "
            "inputs are listed largest first with the first 12 hex digits of their sha256."
        )
    )
    headers = ["run", "stage", "status", "code version", "finished (seconds)", "inputs (sha256)", "from stages"]
    rows = []
    for node in data.stages:
        m = node.manifest
        inputs = sorted(m.inputs, key=lambda ref: -(ref.get("size") or 0))
        listed = [f"{_short_uri(ref.get('uri', ''), data.store_uri)} {str(ref.get('sha256', ''))[:12]}" for ref in inputs[:MAX_INPUTS]]
        if len(inputs) > MAX_INPUTS:
            listed.append(f"+{len(inputs) - MAX_INPUTS} more")
        rows.append(
            [
                m.run_id,
                m.stage,
                m.status,
                m.code_version,
                ((m.finished_at or "")[:16].replace("T", " ") or "—") + (f" ({m.seconds:,.1f})" if _finite(m.seconds) else ""),
                "\n".join(listed) or "—",
                "\n".join(f"{run}/{stage}" for run, stage in node.parents) or "—",
            ]
        )
    section.blocks.append(Table(headers, rows, [MONO, MONO, TEXT, TEXT, NOWRAP, WIDE, MONO]))
    return section


# --- data helpers ------------------------------------------------------------------------------------


def _share(data: ReportData) -> tuple[int, int] | None:
    primary = data.primary_training
    if primary is not None and primary.share:
        return primary.share
    if len(data.selections) == 1:
        return _selection_share(data, data.selections[0])
    return None


def _selection_share(data: ReportData, selection: Selection) -> tuple[int, int] | None:
    """From the training built on the selection (the whole model's parameters), else the selection's own count."""
    trained = [t for t in data.trainings if selection.key in data.ancestors(t.key) and t.share]
    return trained[0].share if trained else selection.share


def _metric_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One row per metric and dataset: base, trained, delta (stored, else computed) and relative change."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for r in evaluation.rows:
        entry = merged.setdefault(
            (str(r["metric"]), str(r["dataset"])), {"metric": r["metric"], "dataset": r["dataset"], "tokens": None, "role": r.get("role")}
        )
        entry[str(r["model"])] = r.get("value")
        entry["tokens"] = entry["tokens"] if entry["tokens"] is not None else r.get("tokens")
    rows = []
    for (metric, dataset), entry in merged.items():
        base, trained = entry.get("base"), entry.get("trained")
        delta = entry.get("delta", trained - base if base is not None and trained is not None else None)
        relative = delta / base if delta is not None and base else None
        rows.append(
            {
                "metric": metric,
                "dataset": dataset,
                "base": base,
                "trained": trained,
                "delta": delta,
                "relative": relative,
                "tokens": entry["tokens"],
                "role": entry["role"],
            }
        )
    order = {name: i for i, name in enumerate(METRIC_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["metric"], len(order)), _role_order(r), r["dataset"]))


def _role_order(row: dict[str, Any]) -> int:
    """Domain data first; an evaluation written before datasets had roles: its held-out split first."""
    if row.get("role") in ROLE_ORDER:
        return ROLE_ORDER.index(row["role"])
    return 0 if row["dataset"] == "heldout" else len(ROLE_ORDER)


def _candidate(row: dict[str, Any]) -> bool:
    """A tensor the policy chose among (scanned) or trained anyway (always-train)."""
    return bool(row.get("selected")) or _finite(row.get("snr"))


def _for(selection: Selection | None, data: ReportData) -> str:
    """Which selection a chart or line is about, when there are several."""
    return f" — {selection.label}" if selection is not None and len(data.selections) > 1 else ""


def _short_uri(uri: str, store_uri: str) -> str:
    """An input as a reader knows it: `snr table`, a run output by its name (`model/model.safetensors`), else its last two parts.

    Which run and stage wrote it is the lineage table's `from stages` column.
    """
    root = store_uri.rstrip("/") + "/"
    key = unquote(uri[len(root) :]) if uri.startswith(root) else None
    if key and (table := re.fullmatch(r"tables/([^/]+)/stage=[^/]+/run_id=[^/]+/[^/]+", key)):
        return f"{table.group(1)} table"
    if key and (output := re.fullmatch(r"runs/[^/]+/[^/]+/(.+)", key)):
        return output.group(1)
    return "/".join(unquote(uri).rstrip("/").split("/")[-2:])


def _dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def _mean(values) -> float | None:
    found = [float(v) for v in values if _finite(v)]
    return sum(found) / len(found) if found else None


def _max(values) -> float | None:
    found = [float(v) for v in values if _finite(v)]
    return max(found) if found else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


# --- number formats ----------------------------------------------------------------------------------


def _number(value: Any, scale: float = 1.0) -> str:
    if not _finite(value):
        return "—"
    v = float(value) * scale
    magnitude = abs(v)
    if magnitude >= 1000:
        return f"{v:,.0f}"
    if magnitude >= 100:
        return f"{v:.1f}"
    if magnitude >= 10:
        return f"{v:.2f}"
    if magnitude >= 0.1 or v == 0:
        return f"{v:.3f}"
    return f"{v:.4f}" if magnitude >= 0.001 else f"{v:.2e}"


def _signed(value: Any) -> str:
    text = _number(value)
    return text if text == "—" or text.startswith("-") else f"+{text}"


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if _finite(value) else "—"


def _signed_percent(value: Any) -> str:
    return f"{100 * float(value):+.1f}%" if _finite(value) else "—"


def _share_text(share: tuple[int, int]) -> str:
    return f"{_percent(share[0] / share[1])} ({share[0]:,} of {share[1]:,} parameters)"


def _times(ratio: Any) -> str:
    return f"×{float(ratio):.2f}" if _finite(ratio) else "—"


def _with_ratio(value: Any, ratio: Any) -> str:
    text = _number(value)
    return f"{text} ({_times(ratio)})" if text != "—" and _finite(ratio) else text


def _before_after(before: Any, after: Any) -> str:
    if not _finite(after):
        return "—"
    return f"{_number(before)} → {_number(after)}" if _finite(before) else _number(after)


# --- output formats ----------------------------------------------------------------------------------

CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --band: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, "Noto Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.7rem; margin: 0 0 6px; }
h1 code { font-size: 1.45rem; }
h2 { font-size: 1.25rem; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.summary { display: flex; flex-wrap: wrap; gap: 6px 8px; list-style: none; padding: 0; margin: 10px 0; }
.summary li { background: var(--band); border: 1px solid var(--line); border-radius: 14px; padding: 2px 12px; font-size: 0.92rem; }
.meta { color: var(--muted); font-size: 0.85rem; margin: 4px 0 0; }
nav { margin: 14px 0 0; font-size: 0.9rem; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
p.missing { color: var(--muted); font-style: italic; }
figure { margin: 12px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.table-wrap { overflow-x: auto; margin: 10px 0 16px; }
table { border-collapse: collapse; font-size: 0.88rem; min-width: 50%; }
th, td { border: 1px solid var(--line); padding: 4px 10px; vertical-align: top; text-align: left; }
th { background: var(--band); font-weight: 600; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.mono { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.8rem; overflow-wrap: break-word;
          min-width: 8em; }
td.wide { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.8rem; min-width: 20em; }
td.code { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.8rem; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def to_html(document: Document, kind: str = "run") -> str:
    """One self-contained page: inline CSS, charts as data URIs, nothing fetched. `kind`: what the page reports (run, line)."""
    esc = html.escape
    title = "Spectrum report" if kind == "run" else f"Spectrum {kind} report"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title}: {esc(document.run_id)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<header><h1>{title}: {kind} <code>{esc(document.run_id)}</code></h1>",
        '<ul class="summary">' + "".join(f"<li>{esc(fact)}</li>" for fact in document.summary) + "</ul>",
        f'<p class="meta">{" · ".join(esc(item) for item in document.meta)}</p>',
        "<nav>" + "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in document.sections) + "</nav></header>",
    ]
    for section in document.sections:
        parts.append(f'<section id="{section.id}"><h2>{esc(section.title)}</h2>')
        parts += [_html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Text):
        return f'<p class="missing">{esc(block.text)}</p>' if block.missing else f"<p>{esc(block.text)}</p>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.alt)}"></figure>'
    classes = [kind if kind != TEXT else "" for kind in block.kinds]
    head = "".join(f'<th class="{"num" if kind == NUM else ""}">{esc(h)}</th>' for h, kind in zip(block.headers, block.kinds, strict=True))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{c}">{_html_cell(cell, c in (MONO, WIDE))}</td>' for c, cell in zip(classes, row, strict=True))
        + "</tr>"
        for row in block.rows
    )
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_cell(text: str, breakable: bool) -> str:
    """Escaped, lines joined by <br>; a long name or path may break after / . or - (nowhere else)."""
    lines = [html.escape(line) for line in text.split("\n")]
    if breakable:
        lines = [re.sub(r"([/.-])", r"\1<wbr>", line) for line in lines]
    return "<br>".join(lines)


def to_markdown(document: Document, html_name: str) -> str:
    """The same report as Markdown: text and tables; the charts are in the HTML file beside it."""
    lines = [f"# Spectrum report: run {_md_code(document.run_id)}", ""]
    lines += [f"- {_md(fact)}" for fact in document.summary] + ([""] if document.summary else [])
    lines += [" · ".join(_md(item) for item in document.meta), ""]
    link = f"[{_md(html_name)}]({quote(html_name)})"
    for section in document.sections:
        lines += [f"## {_md(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [f"_{_md(block.text)}_" if block.missing else _md(block.text), ""]
            elif isinstance(block, Image):
                lines += [f"_Chart: {_md(block.alt)} (in {link})._", ""]
            else:
                lines += [*_markdown_table(block), ""]
    return "\n".join(lines).rstrip() + "\n"


MD_SPECIAL = re.compile(r"[\\`*\[\]|~$#]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # `_` inside a word never emphasises


def _md(text: str) -> str:
    """Text shown as it is in Markdown: HTML characters as entities, Markdown's punctuation backslash-escaped, one line."""
    text = " ".join(str(text).splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return MD_SPECIAL.sub(lambda match: "\\" + match.group(0), text)


def _md_code(text: str) -> str:
    """A code span that holds any text: a fence longer than any run of backticks in it."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _markdown_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return "<br>".join(_md(line) for line in text.split("\n"))

    rows = [[cell(h) for h in table.headers], *([cell(c) for c in row] for row in table.rows)]
    widths = [max(3, *(len(row[i]) for row in rows)) for i in range(len(table.headers))]
    rule = [("-" * (w - 1) + ":") if n else "-" * w for w, n in zip(widths, table.numeric, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, table.numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    return [line(rows[0]), "| " + " | ".join(rule) + " |", *(line(r) for r in rows[1:])]
