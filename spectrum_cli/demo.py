"""The main job on the embedded default: the whole pipeline, as one Prefect flow run, on a local store.

It writes a small model (a generated Llama with a tokenizer trained on a generated domain
corpus; or, with --real, the real pretrained SmolLM2-135M-Instruct installed offline), a data
drop of plant logs and chat rows about them, and a pipeline config, then runs
download → snr_scan → layer_select → cpt → sft → evaluate and the report through Prefect (an
ephemeral API; nothing to start by hand). Everything lands in `<workdir>/store` as runs with
manifests, exactly as production runs land in S3. Running it again reuses every committed stage.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from stages.base.errors import InputError
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import EOS, domain_corpus, write_tokenizer

HELP = "run the whole pipeline on a generated model and data drop (the embedded default), with its report"
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


def run(args: argparse.Namespace) -> str:
    if args.layers < 1:
        raise InputError(f"--layers must be at least 1, got {args.layers}")
    if not 0 < args.top_percent <= 100:
        raise InputError(f"--top-percent must be in (0, 100], got {args.top_percent:g}")
    workdir = Path(args.workdir).resolve()
    config = write_inputs(workdir, args.layers, args.top_percent, args.real, args.overwrite)
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))  # Prefect's database, private to the demo
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.prefect_api import start_prefect

    start_prefect()  # the temporary server, tied to this process
    from flows.pipeline import pipeline_flow

    outcome = pipeline_flow(str(config))
    reused = f" ({len(outcome['cached'])} of {len(outcome['ran'])} stages reused)" if outcome["cached"] else ""
    return "\n".join(
        [
            *outcome["lines"],
            f"pipeline run {outcome['run_id']}{reused}; store {workdir / 'store'}",
            f"report: {outcome['report']}",
            f"next: spectrum runs --store {workdir / 'store'}; spectrum audit {outcome['run_id']} --store {workdir / 'store'}",
        ]
    )


def write_inputs(workdir: Path, layers: int, top_percent: float, real: bool, overwrite: bool) -> Path:
    """The model, the drops and pipeline.yaml (kept when present, unless `overwrite`)."""
    model = workdir / ("smollm2" if real else "model")
    corpus = domain_corpus(400)
    if real:
        from stages.sample_models.smollm2 import write_smollm2

        write_smollm2(model)
    elif overwrite or not (model / "tokenizer.json").exists():
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
            "layer_select": {"top_percent": top_percent},
            "cpt": {"max_steps": 10, "warmup_steps": 2, **steps},
            "sft": {"data": str(chats), "max_steps": 6, "warmup_steps": 1, "heldout_percent": 10, **steps},
            "evaluate": {"seq_len": 128, "max_tokens": 4096 if real else 8192},
        },
    }
    config = workdir / "pipeline.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config
