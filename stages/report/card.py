"""The Hugging Face model card (`README.md`) of a trained model, generated from the store's records.

    facts = card_facts(store, run_id, step="cpt", prices=Prices.parse(4.5, "--price-per-device-hour"))
    text = render_card(facts)

`training_facts` builds a card's facts from one training's records: its parameters and inputs (the
manifest's), its training.json, its trained_tensors rows and the selection input; the selection's
layer_select run and the SNR scan it selected from are read where their keys (`runs/<run>/<step>/…`)
say, and the download the base model came from in the training's and the scan's runs, else among
the store's downloads (the cache index): no other run's manifest is read. The training stage calls
it at produce time with what it is about to publish (no evaluation and no compute: the training has
not finished), and `card_facts` calls it with what a committed run recorded, adding the evaluation
and the compute; so the card in a model folder is `render_card(card_facts(store, run))` without
those two, for a pipeline run and a hand-run stage alike. At training time nothing about the card
fails the stage: on any error the card is a minimal one that says why (`training_card`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from ..base.contracts import (
    CPT,
    DOWNLOAD,
    EVALUATE,
    EVALUATION_TABLE,
    LAYER_SELECT,
    MODEL_FOLDER,
    SELECTION_JSON_FILE,
    SFT,
    SNR_SCAN,
    SNR_TABLE,
    SUCCEEDED,
    TRAINED_TENSORS_TABLE,
    TRAINING_FILE,
    base_stage,
)
from ..base.errors import InputError
from ..selection.document import SelectionDocument, UnfrozenParameters
from ..store import ArtifactNotFoundError, ArtifactStore, Manifest, output_key, read_output, resolve_run_reference
from ..store.base import sha256_bytes
from ..store.compute import Prices, describe_usage, usage
from ..store.keys import NAME
from ..store.manifest import load_manifest_or_none
from ..store.scrub import redact
from ..store.tables import table_rows
from ..store.trees import STORE_SCHEME, ListedFile, Listing, StoreLocation, as_tree, resolve_uri
from ..weights.hub import is_hub_id
from ..weights.roles import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, roles_from_conventional_names

CARD_FILE = "README.md"  # in the model folder: runs/<run>/<cpt|sft>/model/README.md
STAGE_TAGS = {CPT: "continued-pretraining", SFT: "sft"}
NOT_AVAILABLE = "n/a"
MAX_SELECTION_FILE_BYTES = 64 * 1024 * 1024
MAX_REASON_CHARS = 500  # of the one-line reason a minimal card gives
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorFact:
    name: str
    parameters: int
    snr: float | None  # from the scan the selection came from; None: no scan known, or the tensor was not scanned
    relative_change: float | None


@dataclass(frozen=True)
class EvaluationFact:
    metric: str
    dataset: str
    base: float | None
    trained: float | None
    delta: float | None


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card says, as plain values (render_card turns them into the README)."""

    run_id: str
    step: str  # cpt, sft or a step of them (cpt.x)
    code_version: str
    store_uri: str  # redacted
    base_model: str  # a hub id when the model came from the hub, else where training.json says it was
    datasets: tuple[str, ...]  # sha256-… digests of the data trees (the store's tree names)
    data_location: str | None
    method: str  # selection, full or lora
    lora_rank: int
    selection_source: str | None  # where the selection was read (its store or file URI)
    selection_sha256: str | None
    policy: Mapping[str, Any] | None  # the layer_select options the selection recorded
    estimator: str | None
    scan: str | None  # RUN/STEP of the SNR scan the selection was made from
    trainable_parameters: int | None
    total_parameters: int | None
    embeddings: tuple[tuple[str, str, bool], ...]  # (tensor, role, trainable)
    tensors: tuple[TensorFact, ...]  # the trainable tensors, in the checkpoint's order
    steps: int | None
    evaluation: tuple[EvaluationFact, ...] | None = None
    evaluation_source: str | None = None  # RUN/STEP of the evaluation, or why there is none
    compute: str | None = None  # describe_usage of the training's compute
    gpu_hours: float | None = None
    cost: float | None = None
    selection_run: str | None = None  # RUN/STEP of the layer_select that wrote the selection; None: not traced to one
    unavailable: str | None = None  # why only a minimal card could be built at training time (one line); None: the full card

    @property
    def stage(self) -> str:
        return base_stage(self.step)

    def at_training(self) -> CardFacts:
        """The facts the training stage knows when it writes the card: no evaluation, no compute yet."""
        return replace(self, evaluation=None, evaluation_source=None, compute=None, gpu_hours=None, cost=None)

    @property
    def card_command(self) -> str:
        return f"spectrum card {self.run_id} --step {self.step} --store {self.store_uri}"

    @property
    def audit_command(self) -> str:
        return f"spectrum audit {self.run_id} --store {self.store_uri}"


# --- facts from records ---------------------------------------------------------------------------------


def training_facts(
    store: ArtifactStore,
    manifest: Manifest,
    record: Mapping[str, Any],
    tensors: Sequence[Mapping[str, Any]],
    selection_ref: Mapping[str, Any] | None,
) -> CardFacts:
    """The card facts the training stage writes at produce time, after training: never raises (a card must not fail a
    finished training). On any error: the minimal facts, saying why, and one warning."""
    try:
        return _training_facts(_Lineage(store), manifest, record, tensors, selection_ref)
    except Exception as exc:  # noqa: BLE001 - any failure here would throw away a finished training
        return _minimal_facts(store, manifest, record, selection_ref, _minimal_because(manifest, exc))


def training_card(
    store: ArtifactStore,
    manifest: Manifest,
    record: Mapping[str, Any],
    tensors: Sequence[Mapping[str, Any]],
    selection_ref: Mapping[str, Any] | None,
) -> str:
    """The README.md the training stage writes into the model folder; never raises (see training_facts)."""
    facts = training_facts(store, manifest, record, tensors, selection_ref)
    try:
        return render_card(facts)
    except Exception as exc:  # noqa: BLE001 - as in training_facts
        return render_card(_minimal_facts(store, manifest, record, selection_ref, _minimal_because(manifest, exc)))


def _minimal_because(manifest: Manifest, exc: Exception) -> str:
    """The one-line reason a minimal card gives, warned about once."""
    reason = _one_line(redact(f"{type(exc).__name__}: {exc}"))
    reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1].rstrip() + "…"
    log.warning("the model card of %s/%s is minimal: %s", manifest.run_id, manifest.stage, reason)
    return reason


def _training_facts(
    lineage: _Lineage,
    manifest: Manifest,
    record: Mapping[str, Any],
    tensors: Sequence[Mapping[str, Any]],
    selection_ref: Mapping[str, Any] | None,
) -> CardFacts:
    """A training's card facts from its manifest (started or committed: parameters and inputs), its training.json
    record, its trained_tensors rows and its selection input; no evaluation, no compute."""
    store = lineage.store
    method, lora_rank = _method(manifest)
    selection = _selection(lineage, selection_ref, record) if method == "selection" else _Selection()
    snr = {row["tensor_name"]: row for row in selection.snr_rows}
    trainable = [row for row in tensors if row.get("trainable")]
    data = record.get("data")
    runs = (manifest.run_id, *((selection.scan_run,) if selection.scan_run else ()))
    return CardFacts(
        run_id=manifest.run_id,
        step=manifest.stage,
        code_version=manifest.code_version,
        store_uri=redact(store.root_uri),
        base_model=_base_model(str(record.get("model") or ""), manifest.inputs, lineage, runs),
        datasets=tuple(filter(None, [_data_tree(str(data), manifest.inputs, store)])) if data else (),
        data_location=redact(str(data)) if data else None,
        method=method,
        lora_rank=lora_rank,
        selection_source=redact(str(selection_ref["uri"])) if selection_ref else None,
        selection_sha256=str(selection_ref["sha256"]) if selection_ref else None,
        policy=selection.policy,
        estimator=selection.estimator,
        scan=selection.scan,
        trainable_parameters=_count(record.get("trainable_parameters")),
        total_parameters=_count(record.get("total_parameters")),
        embeddings=_embeddings(tensors, selection.snr_rows),
        tensors=tuple(_tensor(row, snr.get(row["tensor_name"])) for row in trainable),
        steps=_count(record.get("steps")),
        selection_run=selection.run,
    )


def _minimal_facts(
    store: ArtifactStore, manifest: Manifest, record: Mapping[str, Any], selection_ref: Mapping[str, Any] | None, reason: str
) -> CardFacts:
    """What a card can say without reading anything: the run, the base model's and the data's locations, the method."""
    method, lora_rank = _method(manifest)
    model, data = record.get("model"), record.get("data")
    return CardFacts(
        run_id=manifest.run_id,
        step=manifest.stage,
        code_version=str(manifest.code_version),
        store_uri=redact(store.root_uri),
        base_model=redact(str(model)) if model else NOT_AVAILABLE,
        datasets=(),
        data_location=redact(str(data)) if data else None,
        method=method,
        lora_rank=lora_rank,
        selection_source=redact(str(selection_ref.get("uri"))) if selection_ref else None,
        selection_sha256=str(selection_ref.get("sha256")) if selection_ref else None,
        policy=None,
        estimator=None,
        scan=None,
        trainable_parameters=_count(record.get("trainable_parameters")),
        total_parameters=_count(record.get("total_parameters")),
        embeddings=(),
        tensors=(),
        steps=_count(record.get("steps")),
        unavailable=reason,
    )


def _method(manifest: Manifest) -> tuple[str, int]:
    lora_rank = _count(manifest.parameters.get("lora_rank")) or 0
    return ("full" if manifest.parameters.get("full") else "lora" if lora_rank else "selection"), lora_rank


def card_facts(
    store: ArtifactStore, run_id: str, step: str = CPT, evaluation_run: str | None = None, prices: Prices | None = None, currency: str = ""
) -> CardFacts:
    """The full card of a committed training: its facts, the evaluation (the run's own evaluate step, or `evaluation_run`)
    and the training's compute (priced with `prices`, the cost shown with `currency`). InputError when the run has no
    such training or it failed; unlike training_facts, any other error is raised."""
    manifest = _committed_training(store, run_id, step)
    record = json.loads(read_output(store, manifest, TRAINING_FILE)[0])
    rows = table_rows(store, manifest, TRAINED_TENSORS_TABLE)
    selection_ref = manifest.inputs[-1] if _trains_a_selection(manifest) and manifest.inputs else None
    facts = _training_facts(_Lineage(store), manifest, record, rows, selection_ref)
    evaluation, source = _evaluation(store, run_id, manifest, evaluation_run)
    use = usage([manifest.compute], prices)
    return replace(
        facts,
        evaluation=evaluation,
        evaluation_source=source,
        compute=describe_usage(use, currency),
        gpu_hours=use.gpu_hours if not use.unknown else None,
        cost=use.cost,
    )


def _committed_training(store: ArtifactStore, run_id: str, step: str) -> Manifest:
    if base_stage(step) not in (CPT, SFT) or not NAME.fullmatch(step):
        raise InputError(f"--step {step!r} is not a training step; pass cpt, sft or a step of them (e.g. cpt.x)")
    if not NAME.fullmatch(run_id):
        raise InputError(f"{run_id!r} is not a run id; `spectrum runs --store {redact(store.root_uri)}` lists the runs")
    manifest = load_manifest_or_none(store, run_id, step)
    if manifest is None:
        raise InputError(
            f"run {run_id!r} has no committed {step} step in {redact(store.root_uri)}, so there is no trained model to describe; "
            f"`spectrum runs --store {redact(store.root_uri)}` lists the runs and their steps"
        )
    if manifest.status != SUCCEEDED:
        raise InputError(
            f"the {step} step of run {run_id!r} {manifest.status}: it published no model to describe; "
            f"`spectrum audit {run_id} --store {redact(store.root_uri)}` shows what it recorded"
        )
    return manifest


def _trains_a_selection(manifest: Manifest) -> bool:
    """The runner lists a selection input last, after the model's and the data's files (stages/training/runner.py)."""
    return not manifest.parameters.get("full") and not manifest.parameters.get("lora_rank")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tensor(row: Mapping[str, Any], scanned: Mapping[str, Any] | None) -> TensorFact:
    snr = scanned.get("snr") if scanned and scanned.get("scanned") else None
    return TensorFact(str(row["tensor_name"]), int(row.get("parameter_count") or 0), snr, row.get("relative_change"))


class _Lineage:
    """The store's manifests, each read by its key once: a card reads the lineage it shows, never every manifest of the
    store (a store holds thousands of runs; the training stage writes the card while it holds the GPUs)."""

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._root = store.root_uri.rstrip("/") + "/"
        self._manifests: dict[tuple[str, str], Manifest | None] = {}

    def manifest(self, run_id: str, step: str) -> Manifest | None:
        """The committed manifest of a run's step (a reuse record followed), None when there is none."""
        if not (NAME.fullmatch(run_id) and NAME.fullmatch(step)):
            return None
        if (run_id, step) not in self._manifests:
            self._manifests[run_id, step] = load_manifest_or_none(self.store, run_id, step)
        return self._manifests[run_id, step]

    def key(self, uri: str) -> str | None:
        """The key of a URI in this store (`store:<key>` or under its root), None for anything else."""
        if uri.startswith(STORE_SCHEME):
            return uri[len(STORE_SCHEME) :].strip("/")
        if not uri.startswith(self._root):
            return None
        key = uri[len(self._root) :]
        return unquote(key) if self._root.startswith("file:") else key  # a file store's URIs are percent-encoded paths

    def producer(self, ref: Mapping[str, Any]) -> Manifest | None:
        """The succeeded stage that wrote the stored object `ref` names: its key says which run and step (`_writer`)."""
        key = self.key(str(ref.get("uri") or ""))
        writer = _writer(key) if key else None
        manifest = self.manifest(*writer) if writer else None
        if manifest is None or manifest.status != SUCCEEDED:
            return None
        return manifest if any(o.get("key") == key and o.get("sha256") == ref.get("sha256") for o in manifest.outputs) else None

    def downloads(self) -> Iterator[Manifest]:
        """The downloads that did their work, newest run first: the cache index names them (one small listing of
        `cache/download/`; reuse records are not indexed), and each manifest is read only when the one before did not match."""
        prefix = f"cache/{DOWNLOAD}/"
        found = set()
        for key in self.store.list(prefix):
            parts = key.removeprefix(prefix).split("/")  # <cache key>/<run>.json, or <cache key>/<step>/<run>.json
            found.add((parts[-1].removesuffix(".json"), parts[1] if len(parts) == 3 else DOWNLOAD))
        for run_id, step in sorted(found, reverse=True):
            manifest = self.manifest(run_id, step)
            if manifest is not None:
                yield manifest


def _writer(key: str) -> tuple[str, str] | None:
    """(run, step) of a run's output key: `runs/<run>/<step>/<name>` (output_key) or
    `tables/<table>/stage=<step>/run_id=<run>/<part>` (table_key); None for any other key (a tree, the cache index)."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[0] == "runs":
        return parts[1], parts[2]
    if len(parts) == 5 and parts[0] == "tables" and parts[2].startswith("stage=") and parts[3].startswith("run_id="):
        return parts[3].removeprefix("run_id="), parts[2].removeprefix("stage=")
    return None


@dataclass(frozen=True)
class _Selection:
    policy: Mapping[str, Any] | None = None
    estimator: str | None = None
    scan: str | None = None  # RUN/STEP of the SNR scan
    snr_rows: tuple[dict[str, Any], ...] = ()
    run: str | None = None  # RUN/STEP of the layer_select that wrote the selection

    @property
    def scan_run(self) -> str | None:
        return self.scan.split("/")[0] if self.scan else None


def _selection(lineage: _Lineage, ref: Mapping[str, Any] | None, record: Mapping[str, Any]) -> _Selection:
    """What the selection recorded: from the layer_select run that wrote it (its key names it), else the local file when
    it is still there, else what training.json recorded of it. A local copy of a stored selection is not matched to its
    run by sha256: that would read every layer_select manifest of the store."""
    if not ref:
        return _Selection()
    uri = str(ref["uri"])
    selector = lineage.producer(ref)
    if selector is None or base_stage(selector.stage) != LAYER_SELECT:
        data = _local_bytes(uri, str(ref["sha256"]))
        return _document(data, uri) if data is not None else _recorded_selection(record)
    selection = replace(
        _document(read_output(lineage.store, selector, SELECTION_JSON_FILE)[0], uri), run=f"{selector.run_id}/{selector.stage}"
    )
    scan = next((m for r in selector.inputs if (m := lineage.producer(r)) and base_stage(m.stage) == SNR_SCAN), None)
    if scan is None:
        return selection
    rows = tuple(table_rows(lineage.store, scan, SNR_TABLE))
    return replace(selection, scan=f"{scan.run_id}/{scan.stage}", snr_rows=rows)


def _recorded_selection(record: Mapping[str, Any]) -> _Selection:
    """The policy name and estimator training.json recorded of a selection that can no longer be read."""
    recorded = record.get("selection")
    if not isinstance(recorded, Mapping):
        return _Selection()
    policy, estimator = recorded.get("policy"), recorded.get("estimator")
    return _Selection(
        policy={"policy": policy} if isinstance(policy, str) else None, estimator=estimator if isinstance(estimator, str) else None
    )


def _local_bytes(uri: str, sha256: str) -> bytes | None:
    """A local selection file's bytes, when it is still there with the recorded sha256."""
    if not uri.startswith("file://"):
        return None
    path = Path(unquote(uri.removeprefix("file://")))
    try:
        if path.stat().st_size > MAX_SELECTION_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if sha256_bytes(data) == sha256 else None


def _document(data: bytes, where: str) -> _Selection:
    if where.lower().endswith((".yaml", ".yml")):
        lines = UnfrozenParameters.from_yaml(data, where).lines
        return _Selection(policy={"unfrozen_parameters": f"{len(lines)} patterns (an Axolotl YAML)"})
    document = SelectionDocument.from_json(data, where)
    return _Selection(policy=dict(document.recorded_policy) or None, estimator=document.estimator)


def _base_model(location: str, inputs: Iterable[Mapping[str, Any]], lineage: _Lineage, runs: Sequence[str]) -> str:
    """The hub id when the base model's files (a `models/` tree of the store) were downloaded from the hub, else the location
    training.json recorded. The download is looked for in the training's run and the scan's (a pipeline's own download),
    then among the store's downloads, newest first; the first that wrote the files says where they came from."""
    files = {(key, ref.get("sha256")) for ref in inputs if (key := lineage.key(str(ref.get("uri") or ""))) and key.startswith("models/")}
    if not files:
        return redact(location)
    for download in chain((lineage.manifest(run, DOWNLOAD) for run in runs), lineage.downloads()):
        if download is None or download.status != SUCCEEDED or not any((o.get("key"), o.get("sha256")) in files for o in download.outputs):
            continue
        model = download.parameters.get("model")
        if download.parameters.get("model_commit") and isinstance(model, str) and is_hub_id(model):
            return model
        break  # these files came from a folder, not the hub
    return redact(location)


def _data_tree(location: str, inputs: Iterable[Mapping[str, Any]], store: ArtifactStore) -> str | None:
    """The data's tree digest (`sha256-…`): a stored tree's name, else the digest of the input files under the data folder
    (what `spectrum download --data` of that folder names it)."""
    try:
        located = resolve_uri(location, store)
    except InputError:
        return None
    if isinstance(located, StoreLocation):
        tree = as_tree(located)
        if tree is not None:
            return tree.tree
        prefix = located.uri.rstrip("/") + "/"
    else:
        prefix = located.expanduser().resolve().as_uri().rstrip("/") + "/"
    files = [
        ListedFile(unquote(str(ref["uri"])[len(prefix) :]), str(ref["sha256"]), int(ref["size"]))
        for ref in inputs
        if str(ref.get("uri", "")).startswith(prefix) and isinstance(ref.get("size"), int)
    ]
    return Listing("data", tuple(files)).tree if files else None


def _embeddings(tensors: Sequence[Mapping[str, Any]], snr_rows: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str, bool], ...]:
    """The checkpoint's embedding tensors with their role and whether they trained: the scan's roles, else by convention."""
    trainable = {row["tensor_name"]: bool(row.get("trainable")) for row in tensors}
    roles: dict[str, str] = {}
    for row in snr_rows:
        if row.get("is_input_embedding"):
            roles[row["tensor_name"]] = "input embeddings"
        if row.get("is_output_embedding"):
            roles[row["tensor_name"]] = "output embeddings" if row["tensor_name"] not in roles else "input and output embeddings (tied)"
    if not roles:
        found = roles_from_conventional_names(list(trainable))
        labels = {INPUT_EMBEDDINGS: "input embeddings", OUTPUT_EMBEDDINGS: "output embeddings"}
        for role, label in labels.items():
            roles.update((name, label) for name in found.names(role))
    return tuple((name, role, trainable.get(name, False)) for name, role in roles.items() if name in trainable)


def _evaluation(
    store: ArtifactStore, run_id: str, training: Manifest, evaluation_run: str | None
) -> tuple[tuple[EvaluationFact, ...] | None, str]:
    """The evaluation of this training's model: `evaluation_run`'s, else the run's own evaluate step when it measured it."""
    if evaluation_run is not None:
        eval_run, eval_step = resolve_run_reference(evaluation_run, EVALUATE, "--evaluation-run")
        manifest = load_manifest_or_none(store, eval_run, eval_step)
        if manifest is None or manifest.status != SUCCEEDED:
            state = "has no committed" if manifest is None else f"has a {manifest.status}"
            raise InputError(f"--evaluation-run {evaluation_run}: run {eval_run!r} {state} {eval_step} step; pass an evaluate run")
        if not _measured(manifest, training):
            raise InputError(
                f"--evaluation-run {evaluation_run} evaluated another model, not {training.run_id}/{training.stage}'s; "
                "pass the evaluate run of this training"
            )
    else:
        manifest = load_manifest_or_none(store, run_id, EVALUATE)
        if manifest is None or manifest.status != SUCCEEDED:
            return None, f"no evaluation: run {run_id} has no committed evaluate step (pass --evaluation-run RUN)"
        if not _measured(manifest, training):
            return None, f"no evaluation: {run_id}/{EVALUATE} evaluated another model (pass --evaluation-run RUN)"
    try:
        rows = table_rows(store, manifest, EVALUATION_TABLE)
    except (ArtifactNotFoundError, InputError):
        return None, f"no evaluation: {manifest.run_id}/{manifest.stage} recorded no evaluation table"
    return _pivot(rows), f"{manifest.run_id}/{manifest.stage}"


def _measured(evaluation: Manifest, training: Manifest) -> bool:
    """Whether the evaluation read this training's model (its inputs hold the model folder's files)."""
    folder = output_key(training.run_id, training.stage, MODEL_FOLDER) + "/"
    model = {o["uri"] for o in training.outputs if str(o.get("key", "")).startswith(folder) and o.get("uri")}
    return any(ref.get("uri") in model for ref in evaluation.inputs)


def _pivot(rows: Iterable[Mapping[str, Any]]) -> tuple[EvaluationFact, ...]:
    found: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        found.setdefault((str(row["metric"]), str(row["dataset"])), {})[str(row["model"])] = row["value"]
    return tuple(EvaluationFact(metric, dataset, v.get("base"), v.get("trained"), v.get("delta")) for (metric, dataset), v in found.items())


# --- rendering ----------------------------------------------------------------------------------------------


def render_card(facts: CardFacts) -> str:
    """The README.md: Hugging Face card metadata as YAML front matter, then what was trained, how, and how to audit it."""
    metadata = {
        "base_model": facts.base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["spectrum", STAGE_TAGS.get(facts.stage, facts.stage)],
        "datasets": list(facts.datasets),
    }
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    title = f"# {_one_line(facts.base_model)}: {STAGE_TAGS.get(facts.stage, facts.stage)} with Spectrum"
    if facts.unavailable is not None:  # what training_facts could say without the store's lineage
        reason = f"The full card could not be built at training time: {_one_line(facts.unavailable)}; run `{facts.card_command}` for it."
        return f"---\n{front}---\n\n" + "\n\n".join([title, reason, _overview(facts), "## Audit\n\n" + _audit_text(facts)]) + "\n"
    sections = [
        title,
        _overview(facts),
        "## Selection\n\n" + _selection_text(facts),
        "## Trainable share\n\n" + _share_text(facts),
        "## Tensors trained\n\n" + _tensor_table(facts),
        "## Evaluation\n\n" + _evaluation_text(facts),
        "## Compute\n\n" + _compute_text(facts),
        "## Audit\n\n" + _audit_text(facts),
    ]
    return f"---\n{front}---\n\n" + "\n\n".join(sections) + "\n"


def _overview(facts: CardFacts) -> str:
    data = f"`{_one_line(facts.data_location)}`" if facts.data_location else NOT_AVAILABLE
    digests = ", ".join(f"`{d}`" for d in facts.datasets) or NOT_AVAILABLE
    steps = f" for {facts.steps} optimizer steps" if facts.steps is not None else ""
    return (
        f"Trained by the `{facts.step}` step of run `{facts.run_id}`{steps} (spectrum {_one_line(facts.code_version)}), "
        f"from the base model `{_one_line(facts.base_model)}` on the data {data} (tree {digests}). "
        "This card is generated from the artifact store's records of that run."
    )


def _selection_text(facts: CardFacts) -> str:
    if facts.method == "full":
        return "Full fine-tuning: every parameter was trained (no selection)."
    if facts.method == "lora":
        return f"LoRA adapters of rank {facts.lora_rank} on every linear layer, merged into the weights after training (no selection)."
    source = _one_line(facts.selection_source or NOT_AVAILABLE)
    if facts.selection_run:
        where = f"`{source}`, written by `{facts.selection_run}`"
    else:
        local = "a local selection file " if source.startswith("file://") else ""
        where = f"{local}`{source}`, not traced to a layer_select run of the store"
    lines = [f"- selection: {where} (sha256 `{facts.selection_sha256 or NOT_AVAILABLE}`)"]
    if facts.policy:
        lines += [f"- {name}: `{_one_line(json.dumps(value))}`" for name, value in facts.policy.items()]
    else:
        lines.append("- policy: not recorded (the selection file can no longer be read)")
    lines.append(f"- SNR estimator: {_one_line(facts.estimator or NOT_AVAILABLE)}")
    lines.append(f"- SNR scan: `{facts.scan}`" if facts.scan else "- SNR scan: not found in the store")
    return "\n".join(lines)


def _share_text(facts: CardFacts) -> str:
    if facts.trainable_parameters is None or not facts.total_parameters:
        share = "not recorded"
    else:
        percent = 100 * facts.trainable_parameters / facts.total_parameters
        share = f"{facts.trainable_parameters:,} of {facts.total_parameters:,} parameters ({percent:.2f}%)"
    if facts.embeddings:
        listed = "; ".join(f"`{name}` ({role}, {'trained' if trained else 'frozen'})" for name, role, trained in facts.embeddings)
        embeddings = f"Embedding tensors are counted: {listed}."
    else:
        embeddings = "Embedding tensors are counted (none was identified by name in the checkpoint)."
    return f"Trainable: {share}. {embeddings}"


def _tensor_table(facts: CardFacts) -> str:
    if not facts.tensors:
        return "No tensor was trainable."
    lines = ["| tensor | parameters | SNR | relative change |", "|---|---:|---:|---:|"]
    for tensor in facts.tensors:
        lines.append(f"| `{_cell(tensor.name)}` | {tensor.parameters:,} | {_number(tensor.snr)} | {_number(tensor.relative_change)} |")
    return "\n".join(lines)


def _evaluation_text(facts: CardFacts) -> str:
    if facts.evaluation is None:
        reason = _one_line(facts.evaluation_source) if facts.evaluation_source else "Not in this card: the model had not been evaluated"
        return f"{reason[:1].upper()}{reason[1:]}; `{facts.card_command}` shows it once the model is evaluated."
    lines = [f"From `{facts.evaluation_source}`.", "", "| metric | dataset | base | trained | delta |", "|---|---|---:|---:|---:|"]
    for row in facts.evaluation:
        values = " | ".join(_number(v) for v in (row.base, row.trained, row.delta))
        lines.append(f"| {_cell(row.metric)} | {_cell(row.dataset)} | {values} |")
    return "\n".join(lines)


def _compute_text(facts: CardFacts) -> str:
    if facts.compute is None:
        return f"Not in this card: it is recorded when the training has finished; `{facts.card_command}` shows it."
    return f"Training: {facts.compute}."


def _audit_text(facts: CardFacts) -> str:
    what = "Which tensors were trained, why, and the proof that the rest did not change"
    return f"Run id `{facts.run_id}`. {what}:\n\n```bash\n{facts.audit_command}\n```"


def _number(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.6g}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("`", "'")


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


__all__ = ["CARD_FILE", "CardFacts", "EvaluationFact", "TensorFact", "card_facts", "render_card", "training_card", "training_facts"]
