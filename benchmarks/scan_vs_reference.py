"""Benchmark: our streaming SNR scan against the public Spectrum scanner's approach, same run.

(a) reference: load the whole model in float32 with transformers, `torch.linalg.svdvals` on each
    2-D weight as the scanner calls it, the reference formula in float32;
(b) ours: `python -m stages.snr_scan` (streamed, float64 Gram eigenvalues).
Each runs in its own child process; the parent records wall time, the child reports its peak RSS
(VmHWM, which exec resets, so the parent's footprint is not counted), and the parent compares
the per-type top-25% and top-50% selections of both.

    python benchmarks/scan_vs_reference.py [--workdir benchmark-run] [--layers 20] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reference_child(model_dir: str, out_json: str) -> None:
    """The baseline: the whole model in float32 through transformers, then the reference loop."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.reference_scanner import reference_snr
    from stages.weights.naming import module_type

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, low_cpu_mem_usage=True)
    results = {name: {"snr": snr, "type": module_type(name)} for name, snr in reference_snr(model).items()}
    Path(out_json).write_text(json.dumps(results, indent=4))


def run_as_main(module: str, argv: list[str]) -> None:
    """Run a module as `python -m module argv…` would, in this process; a non-zero exit propagates."""
    import runpy

    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def measured_child(peak_file: str, module: str, argv: list[str]) -> None:
    """Run a module as `python -m` would, then record this process's peak RSS."""
    try:
        run_as_main(module, argv)
    finally:
        status = Path("/proc/self/status").read_text()
        peak_kib = int(status.split("VmHWM:")[1].split()[0])
        Path(peak_file).write_text(str(peak_kib))


def run_child(module: str, argv: list[str], work: Path, label: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    peak_file, log = work / f"{label}.peak", work / f"{label}.log"
    command = [sys.executable, __file__, "--measured-child", str(peak_file), module, *argv]
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{label} failed (exit {code}); see {log}")
    return seconds, int(peak_file.read_text()) / 1024


def picked(selection_json: Path) -> list[str]:
    from stages.selection.document import SelectionDocument

    document = SelectionDocument.from_json(selection_json.read_bytes(), str(selection_json))
    return sorted(n for n in document.unfrozen_parameters if not n.startswith("^"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "benchmark-run"))
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--model", help="scan this Hugging Face model folder instead of a generated one ('smollm2': the real SmolLM2-135M)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra arguments for our scan")
    parser.add_argument("--reference-child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--measured-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measured_child:
        measured_child(args.measured_child[0], args.measured_child[1], args.measured_child[2:])
        return
    if args.reference_child:
        reference_child(*args.reference_child)
        return

    from stages import layer_select
    from stages.base.contracts import SELECTION_JSON_FILE
    from stages.core.stage import StageContext
    from stages.scan.table import load_reference_json
    from stages.weights.checkpoint import ModelWeights

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _model_folder(args, work)
    weights = ModelWeights.open(model_dir)
    print(f"model: {model_dir.name}, {weights.parameter_count / 1e6:.0f}M parameters, {len(weights.shards)} shard(s)")

    reference_json = work / "reference-snr.json"
    ours_table, warm_table = work / "ours-snr.parquet", work / "ours-warm-snr.parquet"
    for table in (ours_table, warm_table):
        table.unlink(missing_ok=True)
    ref_s, ref_mib = run_child(
        "benchmarks.scan_vs_reference", ["--reference-child", str(model_dir), str(reference_json)], work, "reference"
    )
    # First with an empty cache (the embedding roles resolved through transformers, as on a model's
    # first scan), then again with the roles it cached (every later scan of the model or a fine-tune).
    cache = work / "spectrum-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "SPECTRUM_CACHE": str(cache)}
    scan_args = ["--no-progress", *args.extra]
    our_s, our_mib = run_child("stages.snr_scan", [str(model_dir), "--out", str(ours_table), *scan_args], work, "ours", env)
    warm_s, warm_mib = run_child("stages.snr_scan", [str(model_dir), "--out", str(warm_table), *scan_args], work, "ours-warm", env)

    ref = {e.name: e.snr for e in load_reference_json(reference_json)}
    from stages.base.parquet import read_parquet

    ours = {r["module_name"]: r["snr"] for r in read_parquet(ours_table).to_pylist() if r["scanned"]}
    same_tables = _without_seconds(ours_table) == _without_seconds(warm_table)
    # A tied lm_head is a module of its own to the reference but no tensor of the checkpoint: compared where both have it.
    worst = max(abs(ours[k] - v) / abs(v) for k, v in ref.items() if k in ours and math.isfinite(v) and v != 0)
    print(f"reference:            {ref_s:8.1f} s  peak RSS {ref_mib:8.0f} MiB")
    print(f"ours, first scan:     {our_s:8.1f} s  peak RSS {our_mib:8.0f} MiB  (embedding roles resolved through transformers)")
    print(f"ours, roles cached:   {warm_s:8.1f} s  peak RSS {warm_mib:8.0f} MiB  (same table: {same_tables})")
    for label, seconds, mib in (("first scan", our_s, our_mib), ("roles cached", warm_s, warm_mib)):
        print(f"{label}: time {seconds / ref_s:.2f} of the reference ({ref_s / seconds:.2f}x faster), peak RSS {mib / ref_mib:.2f}")
    print(f"matrices: {len(ref)} (reference) / {len(ours)} (ours); worst snr difference {worst:.1e} relative")
    for pct in (25, 50):
        outs = {}
        for label, source in (("reference", reference_json), ("ours", ours_table)):
            out = work / f"selection-{label}-{pct}"
            config = layer_select.SelectConfig(snr_input=str(source), out_dir=str(out), top_percent=pct, overwrite=True)
            layer_select.run(config, StageContext())
            outs[label] = picked(out / SELECTION_JSON_FILE)
        same = outs["reference"] == outs["ours"]
        print(f"per-type top-{pct}% selections identical: {same} ({len(outs['ours'])} matrices)")


def _without_seconds(table: Path) -> list[dict]:
    from stages.base.parquet import read_parquet

    return [{k: v for k, v in row.items() if k != "scan_seconds"} for row in read_parquet(table).to_pylist()]


def _model_folder(args: argparse.Namespace, work: Path) -> Path:
    """--model as given, the real SmolLM2-135M converted once into the workdir, or a generated bf16 Llama."""
    if args.model == "smollm2":
        from stages.sample_models.smollm2 import write_smollm2

        return write_smollm2(work / "smollm2-135m-instruct")
    if args.model:
        return Path(args.model)
    from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model

    spec = SyntheticSpec(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=args.vocab,
        max_shard_bytes=200 * 2**20,
    )
    model_dir = work / f"model-h{args.hidden}-l{args.layers}-v{args.vocab}"
    if not (model_dir / "config.json").exists():
        print(f"generating {model_dir} ...", flush=True)
        write_synthetic_model(model_dir, spec)
    return model_dir


if __name__ == "__main__":
    main()
