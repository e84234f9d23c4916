"""Gather what a report shows from the artifact store: a run's stages and every run its inputs came from.

The report of RUN covers RUN's committed stages plus their lineage: the stages of earlier runs that
produced RUN's inputs, transitively (so the report of an evaluate run finds the cpt run it measured,
the selection that run trained and the SNR scan it selected from). Everything is read from the store:
manifests, the stages' tables and their training records; nothing from Prefect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..base.contracts import (
    COMPARE,
    COMPARISON_TABLE,
    CPT,
    EVALUATE,
    EVALUATION_TABLE,
    LAYER_SELECT,
    SELECTION_TABLE,
    SFT,
    SNR_DRIFT_TABLE,
    SNR_SCAN,
    SNR_TABLE,
    TRAINED_TENSORS_TABLE,
    TRAINING_FILE,
    TRAINING_METRICS_TABLE,
    base_stage,
    step_name,
)
from ..base.errors import InputError
from ..store import ArtifactNotFoundError, ArtifactStore, output_key, read_output, read_table
from ..store.compute import Prices
from ..store.lineage import Key, LineageNode, Producers, ancestors
from ..store.manifest import committed_manifests

TRAINING_STAGES = (CPT, SFT)
BASE_SCAN_STEP = step_name(SNR_SCAN, "evaluate_base")  # evaluate's scan of the base model: the SNR map when no scan stage exists
TABLES = (SNR_TABLE, SELECTION_TABLE, TRAINED_TENSORS_TABLE, TRAINING_METRICS_TABLE, EVALUATION_TABLE, SNR_DRIFT_TABLE, COMPARISON_TABLE)


@dataclass
class Training:
    """One training stage: its per-step metrics, its tensor audit and its record (training.json)."""

    key: Key
    label: str
    metrics: list[dict[str, Any]]
    tensors: list[dict[str, Any]] | None
    record: dict[str, Any] | None

    @property
    def changed(self) -> set[str] | None:
        return None if self.tensors is None else {r["tensor_name"] for r in self.tensors if r.get("changed")}

    @property
    def share(self) -> tuple[int, int] | None:
        """(trainable, total) parameters, from the training record, else from the tensor audit."""
        record = self.record or {}
        if record.get("trainable_parameters") is not None and record.get("total_parameters"):
            return int(record["trainable_parameters"]), int(record["total_parameters"])
        if self.tensors:
            total = sum(r.get("parameter_count") or 0 for r in self.tensors)
            trainable = sum(r.get("parameter_count") or 0 for r in self.tensors if r.get("trainable"))
            return (trainable, total) if total else None
        return None


@dataclass
class Selection:
    """One layer selection, and the tensors that changed in the trainings built on it (None: not trained)."""

    key: Key
    label: str
    rows: list[dict[str, Any]]
    changed: set[str] | None
    snr_key: Key | None = None  # the scan it selected from, when the report has its table
    snr: list[dict[str, Any]] | None = None  # that scan's scanned rows

    @property
    def share(self) -> tuple[int, int] | None:
        total = sum(r.get("parameter_count") or 0 for r in self.rows)
        return (sum(r.get("parameter_count") or 0 for r in self.rows if r.get("selected")), total) if total else None


@dataclass
class Evaluation:
    key: Key
    label: str
    rows: list[dict[str, Any]]  # the evaluation table (model base/trained/delta, metric, dataset, value, tokens)
    drift: list[dict[str, Any]] | None  # the snr_drift table


@dataclass
class ReportData:
    """Everything the report shows, gathered from the store."""

    run_id: str
    store_uri: str
    stages: list[LineageNode]
    labels: dict[Key, str]
    snr: list[dict[str, Any]] | None = None  # the scanned rows of the base model's SNR table
    snr_key: Key | None = None
    selections: list[Selection] = field(default_factory=list)
    trainings: list[Training] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    comparison: list[dict[str, Any]] | None = None
    comparison_key: Key | None = None
    methods: dict[str, str] = field(default_factory=dict)  # run id -> comparison method
    changed: set[str] | None = None  # changed tensors to mark on an SNR map without a selection (one training only)
    prices: Prices | None = None  # price per device-hour: the compute section shows a cost with it
    currency: str = ""

    @property
    def model(self) -> str | None:
        for row in self.snr or []:
            if row.get("model_id"):
                return str(row["model_id"])
        for training in self.trainings:
            if training.record and training.record.get("model"):
                return str(training.record["model"])
        return None

    @property
    def primary_training(self) -> Training | None:
        """The training the run is about: its own (the last), else the only one not trained on further."""
        own = [t for t in self.trainings if self.own(t.key)]
        if own:
            return own[-1]
        leaves = [t for t in self.trainings if not any(t.key in self.ancestors(o.key) for o in self.trainings if o is not t)]
        return leaves[0] if len(leaves) == 1 else None

    def has_data(self) -> bool:
        return bool(self.snr or self.selections or self.trainings or self.evaluations or self.comparison)

    def ancestors(self, key: Key) -> set[Key]:
        return ancestors(self.stages, key)

    def own(self, key: Key) -> bool:
        """A stage of the reported run itself (not one its inputs came from)."""
        return key[0] == self.run_id


def gather(store: ArtifactStore, run_id: str) -> ReportData:
    """The report's data for `run_id`; InputError when the run has no committed stage or nothing to show."""
    everything = committed_manifests(store)
    if not everything.get(run_id):
        raise InputError(
            f"run {run_id!r} has no committed stage in {store.root_uri}, so there is nothing to report; "
            f"`spectrum runs --store {store.root_uri}` lists the runs"
        )
    stages = Producers(everything).walk(everything[run_id])  # the run's stages, then those its inputs came from
    tables = _read_tables(store, stages)
    data = ReportData(run_id=run_id, store_uri=store.root_uri, stages=stages, labels={})
    data.comparison_key, data.comparison = _first(tables[COMPARISON_TABLE], stages, lambda s: base_stage(s) == COMPARE)
    data.methods = _methods(data.comparison or [])
    data.labels = _labels(stages, run_id, data.methods)
    data.snr_key, snr = _snr_source(tables[SNR_TABLE], stages)
    data.snr = _scanned(snr) if snr else None
    data.trainings = [
        Training(
            node.key,
            data.labels[node.key],
            _by_step(tables[TRAINING_METRICS_TABLE][node.key]),
            tables[TRAINED_TENSORS_TABLE].get(node.key),
            _training_record(store, node),
        )
        for node in stages
        if base_stage(node.manifest.stage) in TRAINING_STAGES and node.key in tables[TRAINING_METRICS_TABLE]
    ]
    data.selections = _selections(data, tables[SELECTION_TABLE], tables[SNR_TABLE])
    if not data.selections and (primary := data.primary_training) is not None:
        data.changed = primary.changed
    data.evaluations = _evaluations(data, tables[EVALUATION_TABLE], tables[SNR_DRIFT_TABLE])
    if not data.has_data():
        names = ", ".join(f"{run}/{stage}" for run, stage in (node.key for node in stages))
        raise InputError(
            f"run {run_id!r} has nothing to report: no SNR scan, selection, training, evaluation or comparison data "
            f"in it or in the runs it builds on (committed stages: {names})"
        )
    return data


def _read_tables(store: ArtifactStore, stages: list[LineageNode]) -> dict[str, dict[Key, list[dict[str, Any]]]]:
    """table -> (run, stage) -> rows, for the stages the report covers (committed partitions only)."""
    keys = {node.key for node in stages}
    runs = _unique(node.manifest.run_id for node in stages)
    found: dict[str, dict[Key, list[dict[str, Any]]]] = {}
    for table in TABLES:
        found[table] = {}
        for run in runs:
            try:
                rows = read_table(store, table, run_id=run).to_pylist()
            except ArtifactNotFoundError:
                continue
            for row in rows:
                key = (row.pop("run_id"), row.pop("stage"))
                if key in keys:
                    found[table].setdefault(key, []).append(row)
    return found


def _first(rows: dict[Key, list[dict[str, Any]]], stages: list[LineageNode], wanted) -> tuple[Key | None, list[dict[str, Any]] | None]:
    for node in stages:
        if wanted(node.manifest.stage) and rows.get(node.key):
            return node.key, rows[node.key]
    return None, None


def _snr_source(rows: dict[Key, list[dict[str, Any]]], stages: list[LineageNode]) -> tuple[Key | None, list[dict[str, Any]] | None]:
    """The base model's scan: a `snr_scan` stage (the run's own first), else evaluate's scan of the base model, else any step."""
    for wanted in (lambda stage: stage == SNR_SCAN, lambda stage: stage == BASE_SCAN_STEP, lambda stage: base_stage(stage) == SNR_SCAN):
        key, found = _first(rows, stages, wanted)
        if found:
            return key, found
    return None, None


def _methods(comparison: list[dict[str, Any]]) -> dict[str, str]:
    """Run id -> the comparison method whose arm it is (its training or its evaluation)."""
    methods: dict[str, str] = {}
    for row in comparison:
        for column in ("cpt_run", "evaluate_run"):
            if row.get(column) and row.get("method"):
                methods.setdefault(str(row[column]).split("/")[0], str(row["method"]))
    return methods


def _labels(stages: list[LineageNode], run_id: str, methods: dict[str, str]) -> dict[Key, str]:
    """How the report names a stage: the comparison's method for an arm's run, else `run/stage` (just `stage` in the run itself)."""
    labels = {}
    for node in stages:
        run, stage = node.key
        labels[node.key] = methods.get(run) or (stage if run == run_id else f"{run}/{stage}")
    return labels


def _selections(data: ReportData, rows: dict[Key, list[dict[str, Any]]], scans: dict[Key, list[dict[str, Any]]]) -> list[Selection]:
    """The run's own selections, else those in its lineage; each with what changed in the trainings built on it."""
    candidates = [n for n in data.stages if base_stage(n.manifest.stage) == LAYER_SELECT and rows.get(n.key)]
    own = [n for n in candidates if data.own(n.key)]
    selections = []
    for node in own or candidates:
        trained = [t for t in data.trainings if node.key in data.ancestors(t.key) and t.tensors is not None]
        changed = set().union(*(t.changed or set() for t in trained)) if trained else None
        label = data.labels[node.key]
        methods = {data.methods[t.key[0]] for t in trained if t.key[0] in data.methods}
        if node.key[0] not in data.methods and len(methods) == 1:
            label = methods.pop()  # a comparison arm's selection is named by the method that trained it
        scan = next((parent for parent in node.parents if base_stage(parent[1]) == SNR_SCAN and scans.get(parent)), None)
        selections.append(Selection(node.key, label, rows[node.key], changed, scan, _scanned(scans[scan]) if scan else None))
    return selections


def _evaluations(data: ReportData, rows: dict[Key, list[dict[str, Any]]], drift: dict[Key, list[dict[str, Any]]]) -> list[Evaluation]:
    candidates = [n for n in data.stages if base_stage(n.manifest.stage) == EVALUATE and rows.get(n.key)]
    own = [n for n in candidates if data.own(n.key)]
    return [Evaluation(n.key, data.labels[n.key], rows[n.key], drift.get(n.key)) for n in own or candidates]


def _training_record(store: ArtifactStore, node: LineageNode) -> dict[str, Any] | None:
    manifest = node.manifest
    key = output_key(manifest.run_id, manifest.stage, TRAINING_FILE)
    if not any(output.get("key") == key for output in manifest.outputs):
        return None
    try:
        data, _ = read_output(store, manifest, TRAINING_FILE)
        record = json.loads(data)
    except (InputError, ArtifactNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _scanned(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the matrices an SNR table scanned (1-D tensors and skipped ones are not on the map)."""
    return [r for r in rows if r.get("scanned") and r.get("snr") is not None]


def _by_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: r.get("step") or 0)


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
