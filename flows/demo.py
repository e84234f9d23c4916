"""The embedded-default demo: generate a small model, scan it with both estimators, select layers, train.

The model (with a tokenizer trained on a generated domain corpus) is scanned with both
estimators; the reference selection is then trained for a few steps of continued pre-training
with DeepSpeed on that corpus, and the audit lists the tensors that changed.

Everything is published to a local artifact store (`<workdir>/store`) as runs with manifests,
exactly as production runs land in S3; `spectrum runs` and `spectrum audit` read it back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages import cpt, layer_select, snr_scan
from stages.core.errors import InputError
from stages.core.stage import StageContext
from stages.store import open_store
from stages.store.lineage import audit_run
from stages.testing.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.testing.tokenizer import domain_corpus, write_tokenizer

HELP = "generate a small model, scan it, select layers and train them (the embedded default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-run", help="folder for the generated model and the store (default: demo-run)")
    parser.add_argument("--top-percent", type=float, default=50.0, help="per-type share of matrices to train (default 50)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the generated Llama model (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate the model; new runs are recorded beside earlier ones")


def run(args: argparse.Namespace) -> str:
    if args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    if not 0 < args.top_percent <= 100:
        raise InputError(f"--top-percent must be in (0, 100], got {args.top_percent:g}")
    workdir = Path(args.workdir)
    model_dir = workdir / "model"
    corpus = domain_corpus(400)
    if not (model_dir / "tokenizer.json").exists() or args.overwrite:
        spec = SyntheticSpec(num_hidden_layers=args.layers, max_shard_bytes=4_000_000)
        write_synthetic_model(model_dir, spec)
        write_tokenizer(model_dir, corpus, spec.vocab_size)
    drop = workdir / "drop"
    drop.mkdir(parents=True, exist_ok=True)
    (drop / "plant-logs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    store = open_store(str(workdir / "store"))
    context = StageContext(store=store, force=args.overwrite, work_dir=workdir / "work")
    lines = [f"model: {model_dir} (synthetic Llama, {args.layers} layers, bf16 safetensors)", f"store: {store.root_uri}"]
    for estimator in ("reference", "gavish-donoho"):
        scanned = snr_scan.run(snr_scan.ScanConfig(model_dir=str(model_dir), model_id="demo-llama", estimator=estimator), context)
        lines.extend(f"[{estimator}] {line}" for line in scanned.lines)
        selection_config = layer_select.SelectConfig(
            out_dir=str(workdir / f"selection-{estimator}"), snr_run=scanned.run_id, top_percent=args.top_percent, overwrite=True
        )
        selected = layer_select.run(selection_config, context)
        lines.extend(f"[{estimator}] {line}" for line in selected.lines)
        audit = audit_run(store, selected.run_id)
        trained = ", ".join(r["tensor_name"] for r in audit["selection"]["trainable"][:4])
        lines.append(f"[{estimator}] audit: trainable {trained}, ...")
        if estimator == "reference":
            config = cpt.CptConfig(
                model=str(model_dir), data=str(drop), selection_run=selected.run_id, max_steps=10, seq_len=64,
                micro_batch_size=2, learning_rate=1e-3, warmup_steps=2, save_steps=5,
            )  # fmt: skip
            trained_run = cpt.run(config, context)
            lines.extend(f"[cpt] {line}" for line in trained_run.lines)
            changed = audit_run(store, trained_run.run_id)["training"]["changed"]
            lines.append(f"[cpt] audit: {len(changed)} tensors changed, every frozen tensor bit-identical")
    lines.append(f"next: spectrum runs --store {workdir / 'store'}; spectrum audit RUN_ID --store {workdir / 'store'}")
    return "\n".join(lines)
