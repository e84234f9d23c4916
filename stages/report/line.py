"""`spectrum report --line LINE`: a model line over its generations, as one self-contained HTML page and Markdown beside it.

    result = build_line_report(store, "acme-legal", Path("line.html"))

Read from the store: the line's records (stages/store/lines.py), and per generation (a pipeline run)
its evaluate step's `evaluation` table and its cpt step's `trained_tensors` table. The page shows the
held-out (domain) and general (forgetting) perplexity of each generation's trained model against the
model it started from, promoted and rejected generations marked; the production pointer's history;
and a layers x module-types map of how many generations trained (changed) each tensor. Blocks are
written by render.py, so text from data is escaped the same way (HTML entities, Markdown escapes,
`literal` in the charts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..base.contracts import CPT, EVALUATE, EVALUATION_TABLE, TRAINED_TENSORS_TABLE, base_stage
from ..base.errors import InputError
from ..base.files import ensure_writable, write_atomic
from ..store import ArtifactNotFoundError, ArtifactStore, read_table
from ..store import lines as L
from ..weights.naming import layer_index, module_name, module_type
from . import ReportResult, report_paths
from . import line_charts as charts
from .render import (
    CODE,
    MONO,
    NOWRAP,
    NUM,
    TEXT,
    Block,
    Document,
    Image,
    Section,
    Table,
    Text,
    _markdown_table,
    _md,
    _md_code,
    _number,
    _signed_percent,
    _type_namer,
    to_html,
)

DOMAIN, GENERAL = "domain", "general"
ROLE_TITLES = {DOMAIN: "held-out perplexity (domain)", GENERAL: "general perplexity (forgetting)"}
ROLE_NAMES = {DOMAIN: "held-out", GENERAL: "general"}
NO_LAYER = "no layer"


@dataclass(frozen=True)
class Perplexity:
    """One dataset's perplexity in a generation's evaluation: the starting (base) model's and the trained model's."""

    role: str  # domain | general
    dataset: str
    base: float | None
    trained: float | None

    @property
    def relative(self) -> float | None:
        return (self.trained - self.base) / self.base if self.base and self.trained is not None else None


@dataclass
class Generation:
    """One generation of the line with what its run's tables say."""

    record: L.GenerationRecord
    evaluation: str | None  # the evaluate step whose table was read (None: no evaluation committed)
    perplexities: list[Perplexity]
    training: str | None  # the cpt step whose trained_tensors table was read
    tensors: list[str] | None  # every tensor of its audit (None: no trained_tensors table)
    changed: set[str] | None

    def measured(self, role: str, dataset: str) -> Perplexity | None:
        return next((p for p in self.perplexities if p.role == role and p.dataset == dataset), None)


@dataclass
class LineData:
    line: str
    store_uri: str
    generations: list[Generation]
    pointers: list[L.ProductionPointer]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def production(self) -> L.ProductionPointer | None:
        return self.pointers[-1] if self.pointers else None

    def datasets(self, role: str) -> list[str]:
        """The role's datasets in the order the generations first measured them."""
        return list(dict.fromkeys(p.dataset for g in self.generations for p in g.perplexities if p.role == role))


# --- gathering -----------------------------------------------------------------------------------


def gather_line(store: ArtifactStore, line: str) -> LineData:
    """The line's records and its generations' tables; InputError for an unknown line or one without generations."""
    records = L.generations(store, line)  # validates the name
    if not records:
        known = L.list_lines(store)
        if line not in known:
            have = f"its lines: {', '.join(known)}" if known else "it has no lines"
            raise InputError(f"no line {line!r} in {store.root_uri} ({have}); a line is named by a pipeline config's `line: {{name: …}}`")
        raise InputError(
            f"line {line!r} has no generations yet in {store.uri(L.line_folder(line))}, so there is nothing to report; "
            f"`spectrum line status {line}` shows its records"
        )
    generations = [_generation(store, record) for record in records]
    return LineData(line, store.root_uri, generations, L.pointer_history(store, line), L.skipped_drops(store, line))


def _generation(store: ArtifactStore, record: L.GenerationRecord) -> Generation:
    evaluation, rows = _step_rows(store, EVALUATION_TABLE, record.run_id, EVALUATE)
    training, audit = _step_rows(store, TRAINED_TENSORS_TABLE, record.run_id, CPT)
    tensors = None if audit is None else [str(r["tensor_name"]) for r in audit]
    changed = None if audit is None else {str(r["tensor_name"]) for r in audit if r.get("changed")}
    return Generation(record, evaluation, _perplexities(rows or []), training, tensors, changed)


def _step_rows(store: ArtifactStore, table: str, run_id: str, stage: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """The rows one step of `stage` committed to `table` in the run: the step named `stage` itself, else the first by name."""
    try:
        rows = read_table(store, table, run_id=run_id).to_pylist()
    except ArtifactNotFoundError:
        return None, None
    steps = sorted({str(r["stage"]) for r in rows if base_stage(str(r["stage"])) == stage})
    if not steps:
        return None, None
    step = stage if stage in steps else steps[0]
    return step, [r for r in rows if r["stage"] == step]


def _perplexities(rows: list[dict[str, Any]]) -> list[Perplexity]:
    found: dict[tuple[str, str], dict[str, float | None]] = {}
    for row in rows:
        role = _role(row)
        if row.get("metric") == "perplexity" and role in (DOMAIN, GENERAL):
            found.setdefault((role, str(row["dataset"])), {})[str(row.get("model"))] = row.get("value")
    return [Perplexity(role, dataset, values.get("base"), values.get("trained")) for (role, dataset), values in found.items()]


def _role(row: dict[str, Any]) -> str | None:
    """The dataset's role; for an evaluation written before datasets had roles, from its name."""
    if row.get("role"):
        return str(row["role"])
    dataset = str(row.get("dataset"))
    if dataset == "heldout":
        return DOMAIN
    return GENERAL if dataset == GENERAL or dataset.startswith(f"{GENERAL}:") else None


# --- the document --------------------------------------------------------------------------------


def compose_line(data: LineData) -> Document:
    sections = [_over_time(data), _production(data), _tensor_map(data)]
    meta = [f"store {data.store_uri}", f"generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"]
    return Document(data.line, _summary(data), meta, sections)


def _summary(data: LineData) -> list[str]:
    decided = [g.record for g in data.generations]
    promoted = sum(r.promoted for r in decided)
    facts = [f"{len(decided)} generations: {promoted} promoted, {len(decided) - promoted} rejected"]
    production = data.production
    facts.append(
        f"production: generation {production.generation} (run {production.run_id})"
        if production
        else "production: the config's model (no generation promoted)"
    )
    if data.skipped:
        facts.append(f"{len(data.skipped)} drop(s) not trained")
    return facts


def _over_time(data: LineData) -> Section:
    section = Section("generations", "The line over time")
    section.blocks.append(
        Text(
            "Each generation continues pre-training from the model it started from (its base) on one data drop, and its gate "
            "decides whether it becomes production. Perplexity is measured on the trained model (solid) and on its starting "
            "model (dashed): lower is better. A green dot is a promoted generation, a red cross a rejected one; the shaded "
            "generation is production now."
        )
    )
    datasets = [f"{ROLE_NAMES[role]}: {', '.join(data.datasets(role))}" for role in (DOMAIN, GENERAL) if data.datasets(role)]
    if datasets:
        section.blocks.append(Text(f"Datasets measured — {'; '.join(datasets)}."))
    panels = [
        charts.Panel(ROLE_TITLES[role], [_series(data, role, dataset) for dataset in data.datasets(role)]) for role in (DOMAIN, GENERAL)
    ]
    if any(panel.series for panel in panels):
        production = data.production.generation if data.production else None
        numbers = [g.record.generation for g in data.generations]
        ticks = [f"{g.record.generation}\n{g.record.drop}" if g.record.drop else str(g.record.generation) for g in data.generations]
        promoted = [g.record.promoted for g in data.generations]
        png = charts.perplexity_over_generations(numbers, ticks, promoted, production, panels)
        section.blocks.append(Image(png, "held-out and general perplexity per generation, promoted and rejected marked"))
    else:
        section.blocks.append(Text("No generation's evaluation measured perplexity, so there is no chart; the table follows."))
    section.blocks.append(_generations_table(data))
    return section


def _series(data: LineData, role: str, dataset: str) -> charts.Series:
    measured = [g.measured(role, dataset) for g in data.generations]
    return charts.Series(dataset, [m.trained if m else None for m in measured], [m.base if m else None for m in measured])


def _generations_table(data: LineData) -> Table:
    production = data.production.generation if data.production else None
    models = {g.record.model: g.record.generation for g in data.generations}
    headers = ["generation", "drop", "run", "decision", "started from", ROLE_TITLES[DOMAIN], ROLE_TITLES[GENERAL]]
    headers += ["tensors changed", "gate"]
    rows = []
    for g in data.generations:
        record = g.record
        rows.append(
            [
                str(record.generation),
                record.drop or "—",
                record.run_id,
                "\n".join([record.decision, *(["production now"] if record.generation == production else []), _time(record.decided_at)]),
                _started_from(record, models),
                _perplexity_cell(g, DOMAIN),
                _perplexity_cell(g, GENERAL),
                f"{len(g.changed):,} of {len(g.tensors or []):,}" if g.changed is not None else "—",
                _gate_cell(record.reasons),
            ]
        )
    return Table(headers, rows, [NUM, CODE, CODE, NOWRAP, MONO, NOWRAP, NOWRAP, NUM, MONO])


def _time(iso: str) -> str:
    """`2026-01-02T03:04:05.678+00:00` -> `2026-01-02 03:04`: UTC, as the records store it."""
    return iso[:16].replace("T", " ")


def _started_from(record: L.GenerationRecord, models: dict[str, int]) -> str:
    """`generation k` when the line's generation k trained the starting model, else its URI and sha256."""
    start = record.starting_model["uri"]
    parent = models.get(start)
    if parent is not None and parent < record.generation:
        return f"generation {parent}"
    return f"{start}\nsha256 {record.starting_model['sha256'][:12]}"


def _perplexity_cell(generation: Generation, role: str) -> str:
    measured = [p for p in generation.perplexities if p.role == role]
    several = len(measured) > 1
    return (
        "\n".join(
            f"{p.dataset}:\n" * several + f"{_number(p.base)} → {_number(p.trained)}\n{_signed_percent(p.relative)}" for p in measured
        )
        or "—"
    )


def _gate_cell(reasons: list[dict[str, Any]]) -> str:
    """The failed rules (all when none failed), one per line: `FAIL rule: reason` as the gate wrote them."""
    if not reasons:
        return "—"
    failed = [r for r in reasons if r.get("passed") is False]
    if not failed:
        return f"passed ({len(reasons)} check{'s' if len(reasons) != 1 else ''})"
    return "\n".join(_reason(r) for r in failed)


def _reason(reason: dict[str, Any]) -> str:
    if isinstance(reason.get("rule"), str) and isinstance(reason.get("reason"), str):
        return f"FAIL {reason['rule']}: {reason['reason']}"
    return "FAIL " + json.dumps(reason, sort_keys=True, default=str)


def _production(data: LineData) -> Section:
    section = Section("production", "Production pointer")
    if not data.pointers:
        section.blocks.append(Text("No generation was ever promoted: production is still the config's model.", missing=True))
    else:
        section.blocks.append(
            Text("Every re-pointing of the line's production, oldest first (by the gate, by hand, or a rollback); the last is production.")
        )
        headers = ["seq", "generation", "run", "action", "why", "at", "by"]
        rows = [[str(p.seq), str(p.generation), p.run_id, p.action, p.why or "—", _time(p.at), _who(p.by)] for p in data.pointers]
        section.blocks.append(Table(headers, rows, [NUM, NUM, CODE, TEXT, TEXT, NOWRAP, TEXT]))
    if data.skipped:
        section.blocks.append(Text("Drops not trained (older than the last one processed):"))
        rows = [[str(s.get("drop")), str(s.get("reason")), _time(str(s.get("at", "")))] for s in data.skipped]
        section.blocks.append(Table(["drop", "why", "at"], rows, [CODE, TEXT, NOWRAP]))
    return section


def _who(by: Any) -> str:
    if isinstance(by, dict):
        return ", ".join(f"{key} {value}" for key, value in by.items())
    return "—" if by is None else str(by)


def _tensor_map(data: LineData) -> Section:
    section = Section("tensors", "Tensors trained across the line")
    audited = [g for g in data.generations if g.changed is not None]
    if not audited:
        section.blocks.append(Text("No generation has a trained_tensors table (its cpt step's audit), so there is no map.", missing=True))
        return section
    counts = trained_counts(data)
    namer = _type_namer({kind for _, kind in counts})
    cells: dict[tuple[int | None, str], int] = {}
    for (layer, kind), count in counts.items():
        cell = (layer, namer(kind))
        cells[cell] = max(cells.get(cell, 0), count)
    total = len(data.generations)
    section.blocks.append(
        Text(
            f"How many of the line's {total} generations changed each tensor (layer x module type), read from each generation's "
            "tensor audit (the sha256 of its bytes before and after training). Rejected generations count: they trained the "
            "tensor, though production never held their weights."
        )
    )
    missing = [str(g.record.generation) for g in data.generations if g.changed is None]
    if missing:
        section.blocks.append(Text(f"Generation(s) {', '.join(missing)} have no tensor audit and are not counted."))
    map_cells = [charts.CountCell(layer, kind, n) for (layer, kind), n in cells.items()]
    png = charts.trained_count_map(map_cells, total, "Generations that trained each tensor")
    section.blocks.append(Image(png, "layers x module types: how many generations trained each tensor"))
    section.blocks.append(_map_table(cells))
    return section


def trained_counts(data: LineData) -> dict[tuple[int | None, str], int]:
    """(layer index, module type) -> how many generations changed a tensor there (0: audited, never changed)."""
    where: dict[tuple[int | None, str], set[str]] = {}
    for g in data.generations:
        for tensor in g.tensors or []:
            module = module_name(tensor)
            where.setdefault((layer_index(module), module_type(module)), set()).add(tensor)
    return {cell: sum(bool(g.changed and g.changed & tensors) for g in data.generations) for cell, tensors in where.items()}


def _map_table(cells: dict[tuple[int | None, str], int]) -> Table:
    types = list(dict.fromkeys([kind for layer, kind in cells if layer is not None] + [kind for _, kind in cells]))
    layers: list[int | None] = sorted({layer for layer, _ in cells if layer is not None})
    if any(layer is None for layer, _ in cells):
        layers.append(None)
    rows = [
        [NO_LAYER if layer is None else f"layer {layer}", *(str(cells[(layer, kind)]) if (layer, kind) in cells else "—" for kind in types)]
        for layer in layers
    ]
    return Table(["layer", *types], rows, [NOWRAP, *([NUM] * len(types))])


# --- output --------------------------------------------------------------------------------------


def line_markdown(document: Document, html_name: str) -> str:
    """The same page as Markdown (text and tables; the charts are in the HTML beside it)."""
    lines = [f"# Spectrum line report: line {_md_code(document.run_id)}", ""]
    lines += [f"- {_md(fact)}" for fact in document.summary] + [""]
    lines += [" · ".join(_md(item) for item in document.meta), ""]
    link = f"[{_md(html_name)}]({quote(html_name)})"
    for section in document.sections:
        lines += [f"## {_md(section.title)}", ""]
        lines += [line for block in section.blocks for line in _markdown_block(block, link)]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_block(block: Block, link: str) -> list[str]:
    if isinstance(block, Text):
        return [f"_{_md(block.text)}_" if block.missing else _md(block.text), ""]
    if isinstance(block, Image):
        return [f"_Chart: {_md(block.alt)} (in {link})._", ""]
    return [*_markdown_table(block), ""]


def build_line_report(store: ArtifactStore, line: str, out: Path, *, overwrite: bool = False) -> ReportResult:
    """Write the report of model line `line` to `out` (HTML) and `out` with `.md` (Markdown).

    InputError when the output cannot be written (checked first), the line is unknown or has no
    generations; OutputExistsError when a file exists and `overwrite` is off.
    """
    html_path, markdown_path = report_paths(out)
    for path in (html_path, markdown_path):
        ensure_writable(path, overwrite)
    document = compose_line(gather_line(store, line))
    try:
        write_atomic(markdown_path, line_markdown(document, html_path.name).encode("utf-8"), overwrite=overwrite)
        write_atomic(html_path, to_html(document, kind="line").encode("utf-8"), overwrite=overwrite)
    except OSError as exc:
        raise InputError(f"the line report cannot be written to {html_path.parent}: {exc.strerror or exc}") from exc
    sections = tuple(section.id for section in document.sections if section.has_data)
    return ReportResult(html_path, markdown_path, sections, document.images)
