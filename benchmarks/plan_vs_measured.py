"""Benchmark: the memory planner (stages/training/memory_plan.py) against the peak memory a CPU run measures.

Each case trains a generated Llama (full, Spectrum-25 or depth-aware; ZeRO 0, 2 or 3) for a few
steps with the training loop (stages/training/loop.train) in its own process, on the CPU in fp32
as the runner trains there. Measured: the largest `peak_memory_bytes` of the loop's metrics (peak
RSS, loop._peak_memory; the final gather of the state dict comes after them) less the peak RSS
taken in the same process once torch, transformers and DeepSpeed are imported and the process
group exists, before the model is built; then less the same figure of a baseline run: the same
code and ZeRO stage training a model of 1 layer and hidden size 16 (about 140 MiB at ZeRO 0, 190 MiB
at ZeRO 2/3: what DeepSpeed's start and the first backward and step load, whatever the model).
Planned: the plan's total on device "cpu" (a DeepSpeed bucket counts the pages written), which
never includes the interpreter, the libraries or the process group.

Selections, without a scan (memory depends on how many tensors train and on the lowest trainable
layer, not on which SNR chose them): Spectrum-25 trains the embeddings, lm_head and 25% of each
matrix type's layers spread over the depth (the reference policy); depth-aware trains 25% of each
type from the upper layers, embeddings frozen.

Then the plan on paper (no download): Llama-3-70B and Qwen2-72B, CPT with Spectrum-25 and full
fine-tuning, on one node of 8 x H100-80GB, seq-len 4096.

    python benchmarks/plan_vs_measured.py [--sizes small medium large] [--steps 3] [--seq-len 256] [--micro-batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
SIZES = {  # generated Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "small": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=2048
    ),
    "medium": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192
    ),
    "large": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, vocab_size=16384
    ),
}
SELECTIONS = ("full", "spectrum-25", "depth-aware")
ZERO = (0, 2, 3)
TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PAPER = {
    "Llama-3-70B": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "Qwen2-72B": dict(
        model_type="qwen2",
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
H100 = 80 * 10**9  # bytes of an H100-80GB (80 GB, 74.5 GiB)


def selection_patterns(name: str, layers: int) -> tuple[str, ...] | None:
    """The regular expressions of a proxy selection (None: full fine-tuning)."""
    if name == "full":
        return None
    count = max(1, round(layers * 0.25))
    if name == "spectrum-25":
        chosen = [round(i * (layers - 1) / max(count - 1, 1)) for i in range(count)] if count > 1 else [layers // 2]
        extra = [r"model\.embed_tokens\.", r"lm_head\."]
    else:
        chosen = list(range(layers - count, layers))
        extra = []
    return tuple(rf"model\.layers\.{i}\.{kind.replace('.', chr(92) + '.')}\." for kind in TYPES for i in chosen) + tuple(extra)


def planned_model(config, selection: str):
    from stages.training.freezing import apply_selection
    from stages.training.memory_plan import PlannedModel, meta_model, trainable_of
    from stages.training.selection import Selection

    skeleton = meta_model(config)
    patterns = selection_patterns(selection, config.num_hidden_layers)
    apply_selection(skeleton, None if patterns is None else Selection(patterns, selection, {}))
    return PlannedModel(skeleton, trainable_of(skeleton, selection))


def llama_config(shape: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", max_position_embeddings=4096, **shape)


def measure(size: str, selection: str, zero: int, seq_len: int, micro_batch: int, steps: int) -> dict[str, Any]:
    """One case in this process (call it in a fresh one): planned and measured bytes beyond the baseline."""
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from stages.training.freezing import apply_selection
    from stages.training.loop import init_distributed, train
    from stages.training.memory_plan import Setup
    from stages.training.selection import Selection
    from stages.training.settings import TrainingArrays, TrainSettings

    init_distributed()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # as loop._peak_memory reads it
    config = llama_config(BASELINE if size == "baseline" else SIZES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    patterns = selection_patterns(selection, config.num_hidden_layers)
    apply_selection(model, None if patterns is None else Selection(patterns, selection, {}))
    rows = np.random.default_rng(0).integers(0, config.vocab_size, (micro_batch * steps, seq_len))
    settings = TrainSettings(steps, micro_batch, 1, 1e-4, 0, 0.0, 0, 0, zero, False, False, False)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        outcome = train(model, TrainingArrays(rows), settings, Path(folder), progress=False)
    measured = max(row["peak_memory_bytes"] for row in outcome.metrics) - baseline
    setup = Setup(1, zero, False, micro_batch_size=micro_batch, seq_len=seq_len, device="cpu")
    plan = planned_model(config, selection).plan(setup)
    return {"size": size, "selection": selection, "zero": zero, "planned": plan.total, "measured": measured, **plan.components()}


def run_case(size: str, selection: str, zero: int, seq_len: int, micro_batch: int, steps: int, timeout: float = 1800) -> dict[str, Any]:
    """`measure` in a child process (its own peak RSS), with one thread so the cores' other users change nothing."""
    import os

    case = json.dumps([size, selection, zero, seq_len, micro_batch, steps])
    # A clean environment: a caller that trained in-process (a test session) leaves DeepSpeed's and torch's variables behind.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TORCH_EXTENSIONS_DIR")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", case], capture_output=True, text=True, env=env, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paper_plan() -> list[str]:
    """Spectrum-25 and full fine-tuning of Llama-3-70B and Qwen2-72B on 8 x H100-80GB, seq-len 4096, from configs alone."""
    from transformers import AutoConfig

    from stages.training.memory_plan import Setup, cheapest_fit, gib

    lines = ["| model | training | trainable | ZeRO-3, checkpointing, micro-batch 1: per GPU | cheapest configuration that fits 80 GB |"]
    lines.append("|---|---|---|---|---|")
    for name, values in PAPER.items():
        values = dict(values)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        for selection in ("spectrum-25", "full"):
            model = planned_model(config, selection)
            setup = Setup(gpus=8, zero_stage=3, bf16=True, micro_batch_size=1, seq_len=4096, gradient_checkpointing=True)
            plan = model.plan(setup)
            fit = cheapest_fit(model, Setup(gpus=8, bf16=True, micro_batch_size=4, seq_len=4096), H100)
            share = f"{model.trainable.trainable_parameters / 1e9:.1f}B of {model.trainable.total_parameters / 1e9:.1f}B"
            fits = f"{fit.setup.describe()}: {gib(fit.total)}" if fit else "none"
            lines.append(f"| {name} | {selection} | {share} | {gib(plan.total)} | {fits} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--no-paper", action="store_true", help="leave out the 70B/72B plan on paper")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*json.loads(args.measure))))
        return
    print("| size | selection | ZeRO | planned MiB | measured MiB | planned / measured |")
    print("|---|---|---|---|---|---|")
    baselines = {zero: run_case("baseline", "full", zero, 8, 1, args.steps)["measured"] for zero in ZERO}
    for size in args.sizes:
        for selection in SELECTIONS:
            for zero in ZERO:
                row = run_case(size, selection, zero, args.seq_len, args.micro_batch_size, args.steps)
                net = row["measured"] - baselines[zero]
                ratio = row["planned"] / net if net > 0 else float("nan")
                planned, measured = row["planned"] / 2**20, net / 2**20
                print(f"| {size} | {selection} | {zero} | {planned:.1f} | {measured:.1f} | {ratio:.3f} |", flush=True)
    if not args.no_paper:
        print()
        print("\n".join(paper_plan()))


if __name__ == "__main__":
    main()
