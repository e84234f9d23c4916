"""The audit trail of a model line: every tensor of a generation's model, back to the line's base model.

`audit_line` backs `spectrum audit --line LINE [--generation N]`. The model audited (production's, or
generation N's) descends from the base model through a chain of generations: each generation's
record names the model it started from, which is the trained model of an earlier generation (the
one promoted last when it started) or, for the chain's first member, the base model. A rejected
generation is in no chain unless a later generation started from it (a manual promotion).

From each chain member's committed steps it reads the cpt stage's trained_tensors table (sha256 of
every tensor before and after training, changed, relative change) and the snr_scan step's SNR
table (of that generation's starting model). Tensors that no chain member changed are proved
bit-identical to the base by the sha256 chain alone, without re-hashing any model:

- the base's sha256 of a tensor is the "before" of the chain's first member (it hashed the base);
- each later member's "before" equals the previous member's "after", for every tensor (and the
  members list the same tensors), so no bytes changed between two generations;
- within a member, a tensor marked unchanged has after == before (and one marked changed differs);
- where a member's SNR scan hashed a tensor (tensor_sha256), that hash equals the member's "before":
  the model scanned is the model trained.

Any break of these is a CorruptWeightsError naming the tensor, the generations and both hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base.contracts import CPT, SNR_SCAN, SNR_TABLE, SUCCEEDED, TRAINED_TENSORS_TABLE
from ..base.errors import CorruptWeightsError, InputError
from . import lines
from .base import ArtifactStore
from .lines import GenerationRecord
from .manifest import load_manifest_or_none
from .tables import table_rows

IDENTICAL = "identical to base (sha256 chain)"


@dataclass(frozen=True)
class _Member:
    """One generation of the chain with its tables: trained_tensors rows and the SNR scan of its starting model."""

    record: GenerationRecord
    rows: dict[str, dict[str, Any]]  # tensor name -> its trained_tensors row, in the table's order
    scan_run: str | None  # the run whose snr_scan did the work (None: the run has no scan)
    scan: dict[str, dict[str, Any]]  # tensor name -> {snr, tensor_sha256} of that scan

    @property
    def generation(self) -> int:
        return self.record.generation


def audit_line(store: ArtifactStore, line: str, generation: int | None = None) -> dict[str, Any]:
    """The audit of the production model of `line` (or of generation `generation`'s trained model), as plain data.

    Per tensor: the chain generations that changed it (`trained_in`), per generation its SNR at that
    generation's scan (None when not scanned) and relative change, and `cumulative_relative_change`:
    the compounded bound prod(1 + r_g) - 1 over the generations g that changed it, where
    r_g = ||W_g - W_g-1|| / ||W_g-1|| is the relative change the cpt stage measured. By the triangle
    inequality ||W_N - W_0|| / ||W_0|| is at most this value, and equal to r_g for a tensor changed
    by one generation; the exact value needs the weights, which this audit does not read. A tensor
    no chain member changed has 0.0 and is proved identical to the base (module docstring).
    """
    records = lines.generations(store, line)
    if not records:
        known = lines.list_lines(store)
        raise InputError(
            f"line {line!r} has no generations in {store.uri(lines.line_folder(line))} "
            f"({'the lines there: ' + ', '.join(known) if known else 'no line has any record there'}); check the name and --store"
        )
    target, production = _target(store, line, records, generation)
    chain = [_member(store, line, record) for record in _chain(line, records, target)]
    _prove(line, chain)
    tensors = [_tensor(name, chain) for name in chain[0].rows]
    in_chain = {member.generation for member in chain}
    never = [t for t in tensors if not t["trained_in"]]
    return {
        "line": line,
        "store": store.uri(lines.line_folder(line)),
        "target": {
            "generation": target.generation,
            "run_id": target.run_id,
            "model": target.model,
            "decision": target.decision,
            "production": production is not None and production.generation == target.generation,
        },
        "base": chain[0].record.starting_model,
        "chain": [_chain_entry(member) for member in chain],
        "excluded": [
            {"generation": r.generation, "run_id": r.run_id, "drop": r.drop, "decision": r.decision}
            for r in records
            if r.generation < target.generation and r.generation not in in_chain
        ],
        "tensors": tensors,
        "never_trained": {"count": len(never), "proof": IDENTICAL, "tensors": [t["tensor_name"] for t in never]},
    }


def _target(
    store: ArtifactStore, line: str, records: list[GenerationRecord], generation: int | None
) -> tuple[GenerationRecord, lines.ProductionPointer | None]:
    """The generation audited (production's, or `generation`) and the production pointer now."""
    production = lines.production(store, line)
    if generation is not None:
        return lines.generation_record(store, line, generation), production
    if production is None:
        raise InputError(
            f"line {line} has no production model yet (no generation was promoted; it has generations 1..{len(records)}); "
            f"audit one of them: spectrum audit --line {line} --generation N"
        )
    return records[production.generation - 1], production


def _chain(line: str, records: list[GenerationRecord], target: GenerationRecord) -> list[GenerationRecord]:
    """The generations whose trained models led to `target`'s, base first: each started from the one before it."""
    chain = [target]
    while True:
        start = chain[0].starting_model["uri"]
        parents = [r for r in records if r.generation < chain[0].generation and r.model == start]
        if not parents:
            later = [r.generation for r in records if r.generation >= chain[0].generation and r.model == start]
            if later:
                raise InputError(
                    f"line {line}: generation {chain[0].generation} started from {start}, the model of generation {later[0]}, "
                    "which was decided after it: the line's records were changed outside spectrum; restore them"
                )
            return chain
        chain.insert(0, parents[-1])  # the latest such generation (a cpt run reused by two generations names one model)


def _member(store: ArtifactStore, line: str, record: GenerationRecord) -> _Member:
    cpt = load_manifest_or_none(store, record.run_id, CPT)
    where = f"generation {record.generation} of line {line} (run {record.run_id})"
    if cpt is None or cpt.status != SUCCEEDED:
        raise InputError(
            f"{where} has no succeeded cpt stage in {store.root_uri}, so the tensors it trained are unknown; "
            "restore the run's runs/<run>/cpt/ records"
        )
    rows = table_rows(store, cpt, TRAINED_TENSORS_TABLE, required=False)
    if rows is None:
        raise InputError(f"{where}: its cpt stage recorded no trained_tensors table, so what it changed cannot be proved")
    scan = load_manifest_or_none(store, record.run_id, SNR_SCAN)
    scan_rows = table_rows(store, scan, SNR_TABLE, required=False) if scan is not None and scan.status == SUCCEEDED else None
    return _Member(
        record=record,
        rows={row["tensor_name"]: row for row in rows},
        scan_run=scan.run_id if scan_rows is not None else None,
        scan={row["tensor_name"]: {"snr": row.get("snr"), "tensor_sha256": row.get("tensor_sha256")} for row in scan_rows or []},
    )


def _prove(line: str, chain: list[_Member]) -> None:
    """Check the sha256 chain (module docstring); raise CorruptWeightsError at the first break."""
    base_names = set(chain[0].rows)
    previous: _Member | None = None
    for member in chain:
        where = f"line {line}, generation {member.generation} (run {member.record.run_id})"
        names = set(member.rows)
        if names != base_names:
            extra, missing = sorted(names - base_names), sorted(base_names - names)
            raise CorruptWeightsError(
                f"sha256 chain broken at {where}: its trained_tensors table lists other tensors than the base's "
                f"(extra: {', '.join(extra[:3]) or 'none'}; missing: {', '.join(missing[:3]) or 'none'})"
            )
        for name, row in member.rows.items():
            before, after = row["sha256_before"], row["sha256_after"]
            if previous is not None and before != previous.rows[name]["sha256_after"]:
                raise CorruptWeightsError(
                    f"sha256 chain broken at {where}: tensor {name} was {_short(before)} before its training but "
                    f"{_short(previous.rows[name]['sha256_after'])} after generation {previous.generation}'s; "
                    "the model it trained is not the one the earlier generation produced"
                )
            if after is None or bool(row["changed"]) != (after != before):
                raise CorruptWeightsError(
                    f"sha256 chain broken at {where}: tensor {name} is marked {'changed' if row['changed'] else 'unchanged'} "
                    f"but its sha256 went {_short(before)} -> {_short(after)}; its trained_tensors table was altered"
                )
            scanned = member.scan.get(name, {}).get("tensor_sha256")
            if scanned is not None and scanned != before:
                raise CorruptWeightsError(
                    f"sha256 chain broken at {where}: tensor {name} was {_short(scanned)} in the SNR scan of run "
                    f"{member.scan_run} but {_short(before)} before training: the model scanned is not the model trained"
                )
        previous = member


def _tensor(name: str, chain: list[_Member]) -> dict[str, Any]:
    per_generation = []
    for member in chain:
        row = member.rows[name]
        per_generation.append(
            {
                "generation": member.generation,
                "run_id": member.record.run_id,
                "trainable": bool(row["trainable"]),
                "changed": bool(row["changed"]),
                "relative_change": row["relative_change"] if row["changed"] else 0.0,
                "snr": member.scan.get(name, {}).get("snr"),
            }
        )
    trained_in = [g["generation"] for g in per_generation if g["changed"]]
    return {
        "tensor_name": name,
        "trained_in": trained_in,
        "generations": per_generation,
        "cumulative_relative_change": _compounded([g["relative_change"] for g in per_generation]),
        "sha256_base": chain[0].rows[name]["sha256_before"],
        "sha256_now": chain[-1].rows[name]["sha256_after"],
        "proof": IDENTICAL if not trained_in else f"changed by generation {', '.join(map(str, trained_in))}",
    }


def _compounded(changes: list[float | None]) -> float | None:
    """prod(1 + r) - 1 (None when a changed generation measured no relative change, e.g. a reshaped tensor)."""
    total = 1.0
    for change in changes:
        if change is None:
            return None
        total *= 1.0 + change
    return total - 1.0


def _chain_entry(member: _Member) -> dict[str, Any]:
    record = member.record
    return {
        "generation": record.generation,
        "run_id": record.run_id,
        "drop": record.drop,
        "decision": record.decision,
        "starting_model": record.starting_model,
        "model": record.model,
        "scan_run": member.scan_run,
        "tensors": len(member.rows),
        "trainable": sum(1 for row in member.rows.values() if row["trainable"]),
        "changed": [name for name, row in member.rows.items() if row["changed"]],
    }


def _short(digest: str | None) -> str:
    return "missing" if digest is None else f"sha256 {digest[:12]}…"
