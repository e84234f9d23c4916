"""Benchmark: Spectrum training against full fine-tuning, all through the same DeepSpeed cpt stage.

Same model, data, batch and steps for every arm; each arm is `python -m stages.cpt` in its own
process (peak RSS = that child's VmHWM). Arms: full fine-tuning, Spectrum-50 and Spectrum-25
(reference policy: embeddings and lm_head trained), Spectrum-25 depth-aware (upper layers,
embeddings frozen). Printed as ratios to full fine-tuning: median time per step after warm-up,
peak memory, optimizer-state bytes (AdamW: two fp32 moments per trainable parameter), trainable
parameters, and the FLOP floor of a step (forward 2·|W|·T for every matrix; weight gradients
2·|W|·T for trainable ones; input gradients 2·|W|·T for every matrix at or above the lowest
trainable layer, since backward stops there).

    python benchmarks/train_vs_full.py [--layers 12 --hidden 768 --intermediate 2048 --vocab 2048 --seq-len 256 --steps 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.scan_vs_reference import run_child  # noqa: E402  (one measured-child mechanism for all benchmarks)

WARMUP_STEPS = 2


def flop_floor(config, trainable: set[str], tokens: int, lora_rank: int = 0) -> int:
    """FLOPs of one step's matrix products that no implementation can skip (attention scores aside).

    LoRA: the adapted matrices get no weight gradient; their adapters cost 2·r·(in+out)·T forward and
    twice that backward, which is small beside the frozen matrix's input gradient it still needs.
    """
    from stages.weights.naming import layer_index

    hidden, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    per_layer = {
        "self_attn.q_proj": hidden * hidden,
        "self_attn.k_proj": hidden * kv_heads * head_dim,
        "self_attn.v_proj": hidden * kv_heads * head_dim,
        "self_attn.o_proj": hidden * hidden,
        "mlp.gate_proj": hidden * inter,
        "mlp.up_proj": hidden * inter,
        "mlp.down_proj": hidden * inter,
    }
    matrices = {f"model.layers.{i}.{name}.weight": size for i in range(layers) for name, size in per_layer.items()}
    matrices["lm_head.weight"] = hidden * vocab
    depths = [layer_index(n) for n in trainable if layer_index(n) is not None]
    lowest = min(depths) if depths else (0 if any("embed_tokens" in n for n in trainable) else layers)
    total = 0
    for name, size in matrices.items():
        total += 2 * size * tokens  # forward
        if name in trainable and lora_rank:
            rows_cols = size // hidden + hidden  # in + out of the adapted matrix
            total += 6 * lora_rank * rows_cols * tokens  # adapter forward and backward
        elif name in trainable:
            total += 2 * size * tokens  # weight gradient
        depth = layer_index(name)
        if (depth if depth is not None else layers) >= lowest and trainable:
            total += 2 * size * tokens  # gradient of the input, on the way down to the lowest trainable layer
    return total


SELECT_OPTIONS = {  # the Spectrum arms: layer_select options
    "spectrum-50": {"top_percent": 50.0},
    "spectrum-25": {"top_percent": 25.0},
    "spectrum-25-depth-aware": {"top_percent": 25.0, "depth_aware": True},
}
LORA_RANK = 16
ARMS = ("full", *SELECT_OPTIONS, f"lora-{LORA_RANK}")


@dataclass(frozen=True)
class Shape:
    """A generated Llama's shape."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int


def generate(work: Path, shape: Shape, dtype: str = "float32") -> tuple[Path, Path]:
    """A generated Llama (once per shape and dtype) with a tokenizer trained on the corpus, and a drop of that corpus."""
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
    from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-l{shape.layers}-h{shape.hidden}-i{shape.intermediate}-v{shape.vocab}-{dtype}"
    corpus = domain_corpus(3000)
    if not (model / "tokenizer.json").exists():
        spec = SyntheticSpec(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=max(1, shape.hidden // 64),
            num_key_value_heads=max(1, shape.hidden // 64),
            vocab_size=shape.vocab,
            dtype=dtype,
            max_shard_bytes=500 * 2**20,
        )
        write_synthetic_model(model, spec)
        write_tokenizer(model, corpus, shape.vocab)
    drop = work / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return model, drop


def scan(model: Path, table: Path) -> Path:
    """The model's SNR table (our scan on the CPU, in this process), once."""
    from stages import snr_scan
    from stages.core.stage import StageContext

    if not table.exists():
        snr_scan.run(snr_scan.ScanConfig(model_dir=str(model), output=str(table)), StageContext(progress=False))
    return table


def arms(work: Path, table: Path, labels: tuple[str, ...] = ARMS) -> dict[str, Path | str | None]:
    """Each arm's training input: None (full), "lora", or a selection.json that layer_select made from `table`."""
    from stages import layer_select
    from stages.core.stage import StageContext

    chosen: dict[str, Path | str | None] = {}
    for label in labels:
        if label == "full":
            chosen[label] = None
        elif label.startswith("lora-"):
            chosen[label] = "lora"
        else:
            out = work / label
            config = layer_select.SelectConfig(snr_input=str(table), out_dir=str(out), overwrite=True, **SELECT_OPTIONS[label])
            layer_select.run(config, StageContext())
            chosen[label] = out / "selection.json"
    return chosen


def cpt_arguments(model: Path, drop: Path, selection: Path | str | None, steps: int, seq_len: int, zero_stage: int) -> list[str]:
    """`python -m stages.cpt` arguments of one arm, without the store, work folder and run options."""
    argv = [str(model), "--data", str(drop), "--max-steps", str(steps), "--seq-len", str(seq_len), "--micro-batch-size", "1"]
    argv += ["--learning-rate", "1e-4", "--zero-stage", str(zero_stage), "--no-progress"]
    if selection is None:
        return [*argv, "--full"]
    if selection == "lora":
        return [*argv, "--lora-rank", str(LORA_RANK)]
    return [*argv, "--selection", str(selection)]


def train_arm(
    model: Path, drop: Path, work: Path, label: str, selection: Path | str | None, steps: int, seq_len: int, zero_stage: int,
    gpu: bool, extra: tuple[str, ...] = (),
) -> dict:  # fmt: skip
    """Train one arm in its own `python -m stages.cpt` process; its step time, peak memory and counts.

    Raises SystemExit naming the child's log when the child fails (benchmarks.scan_vs_reference.run_child).
    """
    from transformers import AutoConfig

    store = work / f"store-{label}"
    shutil.rmtree(store, ignore_errors=True)  # one run per store: its metrics and training.json are this arm's
    argv = cpt_arguments(model, drop, selection, steps, seq_len, zero_stage)
    argv += ["--store", str(store), "--work-dir", str(work / "cpt-work"), "--save-steps", "0", "--force", *extra]
    seconds, rss_mib = run_child("stages.cpt", argv, work, label)
    metrics = metrics_of(store)
    # On a GPU the stage records torch.cuda.max_memory_allocated per step; on the CPU the child's peak RSS counts.
    peak_mib = max(m["peak_memory_bytes"] for m in metrics) / 2**20 if gpu else rss_mib
    parameters = training_record(store)["trainable_parameters"]  # for LoRA: the adapters, not the merged weights
    lora = LORA_RANK if selection == "lora" else 0
    return {
        "seconds": seconds,
        "step_seconds": statistics.median(m["step_seconds"] for m in metrics[WARMUP_STEPS:] or metrics),
        "peak_mib": peak_mib,
        "optimizer_bytes": parameters * 8,
        "trainable": parameters,
        "flops": flop_floor(AutoConfig.from_pretrained(str(model)), set(_trainable(store)), seq_len, lora_rank=lora),
        "first_loss": metrics[0]["loss"],
        "last_loss": metrics[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "benchmark-run" / "train"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="report GPU memory (torch.cuda.max_memory_allocated); bf16")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    work = Path(args.workdir)
    # A bf16 checkpoint on the GPU (frozen weights stay bf16 there), fp32 on the CPU, as each trains.
    model, drop = generate(work, Shape(args.layers, args.hidden, args.intermediate, args.vocab), "bfloat16" if args.gpu else "float32")
    config = AutoConfig.from_pretrained(str(model))
    print(f"model: {model.name}")
    table = scan(model, work / f"snr-{model.name}.parquet")
    total_parameters = sum(p.numel() for p in _meta_model(config).parameters())
    rows = {
        label: train_arm(model, drop, work, label, selection, args.steps, args.seq_len, args.zero_stage, args.gpu)
        for label, selection in arms(work, table).items()
    }
    base = rows["full"]
    where = "bf16 on the GPU" if args.gpu else "fp32 on the CPU"
    print(f"\n{total_parameters / 1e6:.1f}M parameters, seq {args.seq_len}, {args.steps} steps, ZeRO-{args.zero_stage}, {where}")
    print(f"{'arm':26} {'s/step':>8} {'time':>6} {'peak MiB':>9} {'memory':>7} {'optim':>6} {'trainable':>10} {'FLOP floor':>10}  loss")
    for label, row in rows.items():
        print(
            f"{label:26} {row['step_seconds']:8.3f} {row['step_seconds'] / base['step_seconds']:6.2f} {row['peak_mib']:9.0f} "
            f"{row['peak_mib'] / base['peak_mib']:7.2f} {row['optimizer_bytes'] / base['optimizer_bytes']:6.2f} "
            f"{row['trainable'] / base['trainable']:10.2f} {row['flops'] / base['flops']:10.2f}  "
            f"{row['first_loss']:.3f}->{row['last_loss']:.3f}"
        )


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def metrics_of(store: Path) -> list[dict]:
    from stages.store import open_store, read_table

    return sorted(read_table(open_store(str(store)), "training_metrics").to_pylist(), key=lambda r: r["step"])


def training_record(store: Path) -> dict:
    (record,) = store.glob("runs/*/cpt/training.json")
    return json.loads(record.read_text())


def _trainable(store: Path) -> dict[str, int]:
    from stages.store import open_store, read_table

    rows = read_table(open_store(str(store)), "trained_tensors").to_pylist()
    return {r["tensor_name"]: r["parameter_count"] for r in rows if r["trainable"]}


if __name__ == "__main__":
    main()
