"""The main job on the embedded default: the whole pipeline, as one Prefect flow run, on a local store.

It writes a small model (a generated Llama with a tokenizer trained on a generated domain
corpus; or, with --real, the real pretrained SmolLM2-135M-Instruct installed offline), a data
drop of plant logs and chat rows about them, and a pipeline config, then runs
download → snr_scan → layer_select → cpt → sft → evaluate and the report through Prefect (an
ephemeral API; nothing to start by hand). Everything lands in `<workdir>/store` as runs with
manifests, exactly as production runs land in S3. Running it again reuses every committed stage.

With --generations N it then runs a model line (scheduled CPT on data drops): N drops, each
continuing from the model the line promoted last, with a promotion gate (plant-log perplexity
must improve by 1% over the model the generation started from). Drop 2 is Python documentation
instead of plant logs: trained on it, the promoted model forgets plant logs, so it fails the gate
and production stays where it was; generation 3 continues from generation 1. The line's status
and report come at the end.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from stages.base.errors import InputError
from stages.sample_models.tokenizer import EOS, domain_corpus, write_tokenizer

DESCRIPTION = __doc__
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-run", help="folder for the model, data, config, store and report (default: demo-run)")
    parser.add_argument("--top-percent", type=float, default=50.0, help="per-type share of matrices to train (default 50)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the generated Llama model (default 4)")
    parser.add_argument("--real", action="store_true", help="use the real pretrained SmolLM2-135M-Instruct (installed offline by make)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate the inputs; stages with new inputs run again")
    parser.add_argument(
        "--generations", type=int, default=0, help="then run a model line over N data drops with a promotion gate (default 0: none)"
    )


def run(args: argparse.Namespace) -> str:
    if args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    if not 0 < args.top_percent <= 100:
        raise InputError(f"--top-percent must be in (0, 100], got {args.top_percent:g}")
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))  # Prefect's database, private to the demo
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.prefect_api import launch_temporary_server, start_prefect

    launch_temporary_server()  # it boots while the inputs are written and the pipeline is imported
    config = write_inputs(workdir, args.layers, args.top_percent, args.real, args.overwrite)
    from flows.pipeline import pipeline_flow

    start_prefect()  # the temporary server answers, tied to this process

    outcome = pipeline_flow(str(config))
    reused = f" ({len(outcome['cached'])} of {len(outcome['ran'])} stages reused)" if outcome["cached"] else ""
    lines = [
        *outcome["lines"],
        f"pipeline run {outcome['run_id']}{reused}; store {workdir / 'store'}",
        f"report: {outcome['report']}",
        f"next: spectrum runs --store {workdir / 'store'}; spectrum audit {outcome['run_id']} --store {workdir / 'store'}",
    ]
    if args.generations:
        lines += run_line(workdir, config, args.generations)
    return "\n".join(lines)


def run_line(workdir: Path, config: Path, count: int) -> list[str]:
    """The model line: one generation per drop, through the pipeline flow, then the line's status and report."""
    from flows.pipeline import open_pipeline_store, pipeline_flow
    from flows.pipeline_config import load_pipeline_config
    from stages.report.line import build_line_report
    from stages.store import lines

    out = []
    for drop in write_line_drops(workdir, count):
        line_config = write_line_config(workdir, config, drop)
        store = open_pipeline_store(load_pipeline_config(line_config))
        decided = {record.drop: record for record in lines.generations(store, LINE)}
        if drop.name in decided:  # a demo run again: the line decides each drop once
            out.append(f"[line] {LINE}: drop {drop.name} decided already, as generation {decided[drop.name].generation}")
            continue
        outcome = pipeline_flow(str(line_config), drop=drop.name)
        out += [line for line in outcome["lines"] if line.startswith("[line]")]
    status = lines.line_status(store, LINE)
    production = status["production"]
    build_line_report(store, LINE, workdir / "line-report.html", overwrite=True)
    out.append(f"line {LINE}: {len(status['generations'])} generations; production: generation {production['generation']}")
    out.append(f"line report: {workdir / 'line-report.html'}")
    out.append(f"next: spectrum line status {LINE} --store {workdir / 'store'}; spectrum audit --line {LINE} --store {workdir / 'store'}")
    return out


LINE = "demo-plant"
# The generated model starts untrained, so any text lowers its perplexity on any other: a forgetting rule would reject
# every generation. The line's gate is its domain: plant-log perplexity must improve by 1% over the starting model.
LINE_GATE = {"heldout_perplexity": {"max_relative_change": -0.01}}


def write_line_drops(workdir: Path, count: int) -> list[Path]:
    """Drops gen-1 … gen-N of plant logs; gen-2 is Python documentation (off the line's domain: it fails the gate)."""
    from stages.evaluation.corpus import python_docs

    drops = []
    for index in range(1, count + 1):
        drop = workdir / "line-drops" / f"gen-{index}"
        drop.mkdir(parents=True, exist_ok=True)
        texts = python_docs().texts[:300] if index == 2 else domain_corpus(300, seed=100 + index)
        (drop / "part-0.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        drops.append(drop)
    test = workdir / "line-drops" / "plant-test.jsonl"  # the domain the gate measures, the same for every generation
    test.write_text("".join(json.dumps({"text": text}) + "\n" for text in domain_corpus(60, seed=7)))
    return drops


def write_line_config(workdir: Path, config: Path, drop: Path) -> Path:
    """The demo's pipeline config as a model line on `drop` (no sft: the line is continued pre-training)."""
    document = yaml.safe_load(config.read_text())
    document["data"] = str(drop)
    document["stages"].pop("sft", None)
    document["stages"]["evaluate"] = {**document["stages"]["evaluate"], "data": str(workdir / "line-drops" / "plant-test.jsonl")}
    document.update(line={"name": LINE, "continue_from": "promoted"}, gate=LINE_GATE, report=False)
    path = workdir / "line.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def write_inputs(workdir: Path, layers: int, top_percent: float, real: bool, overwrite: bool) -> Path:
    """The model, the drops and pipeline.yaml (kept when present, unless `overwrite`)."""
    model = workdir / ("smollm2" if real else "model")
    corpus = domain_corpus(400)
    if real:
        from stages.sample_models.smollm2 import write_smollm2

        write_smollm2(model)
    elif overwrite or not (model / "tokenizer.json").exists():
        from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model  # torch: only to generate the model

        spec = SyntheticSpec(num_hidden_layers=layers, max_shard_bytes=4_000_000)
        write_synthetic_model(model, spec)
        write_tokenizer(model, corpus, spec.vocab_size)
        (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    drop, chats = workdir / "drop", workdir / "chats"
    drop.mkdir(parents=True, exist_ok=True)
    chats.mkdir(parents=True, exist_ok=True)
    (drop / "plant-logs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    rows = [{"prompt": "what is the status of the plant?", "completion": text} for text in domain_corpus(120, seed=9)]
    (chats / "status.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    steps = {"learning_rate": 3e-4 if real else 3e-3, "seq_len": 128, "micro_batch_size": 2, "save_steps": 5}
    document = {
        "model": str(model),
        "data": str(drop),
        "store": "store",
        "stages": {
            "snr_scan": {"estimator": "gavish-donoho"},  # the recommended estimator (README: "Which selection trains better?")
            "layer_select": {"top_percent": top_percent},
            "cpt": {"max_steps": 10, "warmup_steps": 2, **steps},
            "sft": {"data": str(chats), "max_steps": 6, "warmup_steps": 1, "heldout_percent": 10, **steps},
            "evaluate": {"seq_len": 128, "max_tokens": 4096 if real else 8192},
        },
    }
    config = workdir / "pipeline.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config
