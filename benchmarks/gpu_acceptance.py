"""GPU acceptance: the product's GPU claims in one command and one table (issue 18, part 4).

    python benchmarks/gpu_acceptance.py [--device cuda|cpu] [--tiny] [--workdir DIR] [--steps N]
        [--sections scan train resume] [--shape LAYERS,HIDDEN,INTERMEDIATE,VOCAB] [--seq-len L]

--sections runs some of the table (a section to check again, another model shape for the training
rows and the planner: --shape and --seq-len replace the 1B-class Llama and its sequence length).

Every measurement runs in its own child process (benchmarks.scan_vs_reference.run_child: wall
time and peak RSS; on a GPU the stage's or the child's torch.cuda.max_memory_allocated):

1. scan: `python -m stages.snr_scan` against the reference approach (the whole model in float32,
   svdvals per matrix; on the GPU: on the device) and against the I/O floor (a process that reads
   every tensor with the scan's reader and does nothing else), on a generated bf16 Llama.
2. training: `python -m stages.cpt` on a generated 1B-class Llama (train_gpu.ONE_B_SHAPE) for full
   fine-tuning, Spectrum-25, depth-aware Spectrum-25 and LoRA-16 (the arms of
   benchmarks/train_vs_full.py): median step time, peak memory, ratios to full; at ZeRO-2, and at
   ZeRO-3 with gradient checkpointing (frozen norms there were a known DeepSpeed failure). LoRA
   runs at ZeRO 0-2 only (the stage refuses ZeRO-3): that row reads n/a.
3. the memory planner's prediction for each training row, built as runner._check_fit builds it,
   against the measured peak.
4. resume: a cpt run killed with SIGKILL once its first checkpoint is complete, started again (it
   resumes from that checkpoint), against an uninterrupted run of the same steps: both final losses.

On the CPU (`--device cpu`) training is fp32 and memory is the child's peak RSS (interpreter and
libraries included, so planned/measured there is not the planner's accuracy: see
benchmarks/plan_vs_measured.py). `--tiny` shrinks every model and step count so the whole script
runs on two CPU cores in minutes (the test runs it). The table is printed and written to
--workdir as acceptance.md and acceptance.json. Exit status 1 if a row failed or the resumed loss
differs from the uninterrupted one beyond RESUME_TOLERANCE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.scan_vs_reference import run_child  # noqa: E402
from benchmarks.train_gpu import ONE_B_SEQ_LEN, ONE_B_SHAPE  # noqa: E402
from benchmarks.train_vs_full import (  # noqa: E402
    LORA_RANK,
    Shape,
    arms,
    cpt_arguments,
    generate,
    metrics_of,
    scan,
    train_arm,
    training_record,
)
from stages.base.errors import SpectrumError  # noqa: E402

SECTIONS = ("scan", "train", "resume")
TRAIN_ARMS = ("full", "spectrum-25", "spectrum-25-depth-aware", f"lora-{LORA_RANK}")
SETUPS = {"ZeRO-1": (1, ()), "ZeRO-2": (2, ()), "ZeRO-3 + checkpointing": (3, ("--gradient-checkpointing",))}
DEFAULT_SETUPS = ("ZeRO-2", "ZeRO-3 + checkpointing")
TINY_SHAPE = Shape(layers=4, hidden=64, intermediate=176, vocab=512)
RESUME_SHAPE = Shape(layers=4, hidden=512, intermediate=1408, vocab=8192)  # resume is about correctness, not scale
RESUME_STEPS, RESUME_SAVE = 4, 2  # checkpoint after step 2 of 4; the run is killed once it is complete
# Relative difference of the final losses allowed: fp32 on the CPU resumes bit-identically (tests/test_training_resume.py);
# bf16 CUDA kernels (atomics in the embedding and attention backward) are not bit-deterministic.
RESUME_TOLERANCE = {"cpu": 1e-6, "cuda": 5e-3}


@dataclass
class Row:
    section: str
    case: str
    status: str = "ok"  # ok, FAILED, n/a
    seconds: float | None = None  # scan and resume: the process; training: median step after warm-up
    time_ratio: float | None = None  # to the section's baseline (the reference scan, full fine-tuning)
    peak_mib: float | None = None
    memory_ratio: float | None = None
    planned_mib: float | None = None
    planned_ratio: float | None = None  # planned / measured peak
    loss: str = ""
    notes: str = ""
    values: dict = field(default_factory=dict)  # the numbers behind the row, for the JSON


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps (minutes on two CPU cores)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmark-run" / "gpu-acceptance"))
    parser.add_argument("--steps", type=int, help="training steps per arm (default 12; 4 with --tiny)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="the parts of the table to run")
    parser.add_argument(
        "--setups", nargs="+", choices=list(SETUPS), default=list(DEFAULT_SETUPS), help="the training setups (default: ZeRO-2, ZeRO-3)"
    )
    parser.add_argument("--shape", type=_shape, help="the scan and training model: LAYERS,HIDDEN,INTERMEDIATE,VOCAB")
    parser.add_argument("--seq-len", type=int, help=f"training sequence length (default {ONE_B_SEQ_LEN}; 64 with --tiny)")
    parser.add_argument("--read-child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--reference-child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--gpu-peak-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read_child:
        return read_every_tensor(Path(args.read_child))
    if args.reference_child:
        return reference_on_device(*args.reference_child)
    if args.gpu_peak_child:
        return gpu_peak_child(Path(args.gpu_peak_child[0]), args.gpu_peak_child[1], args.gpu_peak_child[2:])
    steps = (4 if args.tiny else 12) if args.steps is None else args.steps
    if steps < 1:
        parser.error(f"--steps must be at least 1, got {steps}")
    if args.seq_len is not None and args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; run with --device cpu (and --tiny for a quick check)", file=sys.stderr)
            return 2
    return run(args.device, args.tiny, Path(args.workdir), steps, tuple(args.sections), args.shape, args.seq_len, tuple(args.setups))


def run(
    device: str, tiny: bool, work: Path, steps: int, sections: tuple[str, ...] = SECTIONS, shape: Shape | None = None,
    seq_len: int | None = None, setups: tuple[str, ...] = DEFAULT_SETUPS,
) -> int:  # fmt: skip
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    train_shape = shape or (TINY_SHAPE if tiny else ONE_B_SHAPE)
    seq_len = seq_len or (64 if tiny else ONE_B_SEQ_LEN)
    resume_shape, resume_seq = (TINY_SHAPE, 64) if tiny else (RESUME_SHAPE, 256)
    model, drop = generate(work, train_shape, "bfloat16")
    table = work / f"snr-{model.name}.parquet"
    rows = scan_rows(work, model, table, device) if "scan" in sections else []
    if "train" in sections:
        selections = arms(work, scan(model, table), TRAIN_ARMS)  # our scan's table, or made here if that child failed
        rows += training_rows(work, model, drop, selections, steps, seq_len, device, setups)
    resume_model = None
    if "resume" in sections:
        resume_model, _ = generate(work, resume_shape, "bfloat16")
        resume_table = scan(resume_model, work / f"snr-{resume_model.name}.parquet")
        resume_selection = arms(work / "resume", resume_table, ("spectrum-25",))["spectrum-25"]
        rows += resume_rows(work / "resume", resume_model, drop, resume_selection, resume_seq, device)
    header = _header(device, model, train_shape, seq_len, steps, resume_model, resume_seq)
    header.append(f"total: {time.perf_counter() - started:.0f} s")
    lines = [*(f"{line}  " for line in header), "", *markdown(rows)]
    print("\n".join(lines))
    (work / "acceptance.md").write_text("\n".join(lines) + "\n")
    failed = [row for row in rows if row.status == "FAILED"]
    document = {"device": device, "tiny": tiny, "header": header, "rows": [asdict(row) for row in rows], "failed": len(failed)}
    (work / "acceptance.json").write_text(json.dumps(document, indent=2) + "\n")
    if failed:
        print(f"\n{len(failed)} row(s) failed: " + "; ".join(f"{r.section} / {r.case}" for r in failed), file=sys.stderr)
        return 1
    return 0


# ---- 1. scan ---------------------------------------------------------------------------------------------------


def scan_rows(work: Path, model: Path, table: Path, device: str) -> list[Row]:
    """The I/O floor, the reference approach and our scan, each a measured child on `device`."""
    reference_json = work / "reference-snr.json"
    on_gpu = device == "cuda"
    reference = "benchmarks.gpu_acceptance" if on_gpu else "benchmarks.scan_vs_reference"  # on the device, or on the CPU
    ours = [str(model), "--out", str(table), "--device", device, "--no-progress", "--overwrite"]
    children = (
        ("scan-io-floor", "I/O floor: read every tensor", "benchmarks.gpu_acceptance", ["--read-child", str(model)]),
        ("scan-reference", "reference approach", reference, ["--reference-child", str(model), str(reference_json)]),
        ("scan-ours", "ours (python -m stages.snr_scan)", "stages.snr_scan", ours),
    )
    measured: dict[str, Row] = {}
    for label, case, module, argv in children:
        row = Row("scan", case)
        gpu_peak = work / f"{label}.gpu-peak"
        gpu_peak.unlink(missing_ok=True)
        if on_gpu and label != "scan-io-floor":  # the floor reads into host memory: no GPU memory to compare
            module, argv = "benchmarks.gpu_acceptance", ["--gpu-peak-child", str(gpu_peak), module, *argv]
        try:
            seconds, rss = run_child(module, argv, work, label)
        except SystemExit as exc:
            row.status, row.notes = "FAILED", _failure(work, label, exc)
        else:
            row.seconds = seconds
            if on_gpu:
                row.peak_mib = float(gpu_peak.read_text()) / 2**20 if gpu_peak.exists() else None
                row.notes = f"peak RSS {rss:.0f} MiB"
            else:
                row.peak_mib = rss
        measured[label] = row
    floor, reference_row, ours_row = measured.values()
    for row in measured.values():
        row.time_ratio = _ratio(row.seconds, reference_row.seconds)
        row.memory_ratio = _ratio(row.peak_mib, reference_row.peak_mib)
    if ours_row.status == "ok" and floor.status == "ok":
        ours_row.notes = _join(ours_row.notes, f"{ours_row.seconds / floor.seconds:.2f}x the I/O floor's time")
    if ours_row.status == "ok" and reference_row.status == "ok":
        ours_row.notes = _join(ours_row.notes, f"snr within {_worst_difference(table, reference_json):.1e} (relative) of the reference")
    return _progress(list(measured.values()))


def read_every_tensor(model: Path) -> int:
    """The I/O floor's child: every tensor read with the scan's reader (ModelWeights.read_raw), nothing else."""
    from stages.weights.checkpoint import ModelWeights

    weights = ModelWeights.open(model)
    for info in weights.tensors:
        weights.read_raw(info)
    return 0


def reference_on_device(model: str, out: str) -> int:
    """The reference approach with the model on the GPU (gpu_scan.reference_on_gpu), saved as scan_vs_reference saves it."""
    from benchmarks.gpu_scan import reference_on_gpu
    from stages.weights.naming import module_type

    _, results, _ = reference_on_gpu(Path(model))
    Path(out).write_text(json.dumps({name: {"snr": snr, "type": module_type(name)} for name, snr in results.items()}, indent=4))
    return 0


def gpu_peak_child(peak_file: Path, module: str, argv: list[str]) -> int:
    """Run a module as `python -m` would, then record this process's torch.cuda.max_memory_allocated."""
    import torch

    from benchmarks.scan_vs_reference import run_as_main

    run_as_main(module, argv)
    peak_file.write_text(str(torch.cuda.max_memory_allocated()))
    return 0


def _worst_difference(table: Path, reference_json: Path) -> float:
    from benchmarks.gpu_scan import worst_difference
    from stages.base.parquet import read_parquet
    from stages.scan.table import load_reference_json

    ours = {r["module_name"]: r["snr"] for r in read_parquet(table).to_pylist() if r["scanned"]}
    reference = {e.name: e.snr for e in load_reference_json(reference_json) if e.name in ours}
    return worst_difference(ours, reference)


# ---- 2 and 3. training and the planner -------------------------------------------------------------------------


def training_rows(
    work: Path, model: Path, drop: Path, selections: dict, steps: int, seq_len: int, device: str,
    setups: tuple[str, ...] = DEFAULT_SETUPS,
) -> list[Row]:  # fmt: skip
    """Each arm at each setup in its own cpt process, with the planner's prediction beside the measured peak."""
    rows = []
    for setup in setups:
        zero, extra = SETUPS[setup]
        section = f"train {setup}"
        measured: dict[str, Row] = {}
        for arm in TRAIN_ARMS:
            row = Row(section, arm)
            selection = selections[arm]
            if selection == "lora" and zero == 3:
                row.status, row.notes = "n/a", "the cpt stage runs LoRA at ZeRO 0-2 only (adapters merged on one rank)"
                rows.extend(_progress([row]))
                continue
            label = f"train-zero{zero}-{arm}"
            checkpointing = "--gradient-checkpointing" in extra
            try:
                row.planned_mib = planned_bytes(model, selection, zero, seq_len, checkpointing, device) / 2**20
            except SpectrumError as exc:  # the child's pre-flight check says the same, and fails the row
                row.notes = f"no plan: {exc}"
            try:
                result = train_arm(model, drop, work, label, selection, steps, seq_len, zero, device == "cuda", extra)
            except SystemExit as exc:
                row.status, row.notes = "FAILED", _join(row.notes, _failure(work, label, exc))
            else:
                row.seconds, row.peak_mib, row.values = result["step_seconds"], result["peak_mib"], result
                row.planned_ratio = _ratio(row.planned_mib, result["peak_mib"])
                row.loss = f"{result['first_loss']:.4f} -> {result['last_loss']:.4f}"
                row.notes = _join(row.notes, f"{result['trainable'] / 1e6:.1f}M trainable")
            measured[arm] = row
            rows.extend(_progress([row]))
        full = measured.get("full")
        for row in measured.values():
            row.time_ratio = _ratio(row.seconds, full.seconds if full else None)
            row.memory_ratio = _ratio(row.peak_mib, full.peak_mib if full else None)
    return rows


def planned_bytes(model: Path, selection: Path | str | None, zero: int, seq_len: int, checkpointing: bool, device: str) -> int:
    """The memory plan cpt's pre-flight check (runner._check_fit) makes for this run, for one device.

    On a GPU its total; on the CPU its total plus what offload moves to the host (the same memory there).
    """
    from stages.training.freezing import apply_selection
    from stages.training.memory_plan import PlannedModel, Setup, load_config, meta_model, trainable_of
    from stages.training.selection import load_selection

    skeleton = meta_model(load_config(model))
    lora_rank = LORA_RANK if selection == "lora" else 0
    if lora_rank:  # the adapters train, the model's own parameters stay frozen
        for parameter in skeleton.parameters():
            parameter.requires_grad_(False)
    else:
        apply_selection(skeleton, None if selection is None else load_selection(str(selection), None, None))
    on_gpu = device == "cuda"
    setup = Setup(
        gpus=1, zero_stage=zero, bf16=on_gpu, micro_batch_size=1, seq_len=seq_len, gradient_checkpointing=checkpointing, device=device
    )
    plan = PlannedModel(skeleton, trainable_of(skeleton, "this run", lora_rank), lora_rank).plan(setup)
    return plan.total if on_gpu else plan.total + plan.host


# ---- 4. resume after a kill ------------------------------------------------------------------------------------


def resume_rows(work: Path, model: Path, drop: Path, selection: Path, seq_len: int, device: str) -> list[Row]:
    """An uninterrupted cpt run, and the same run SIGKILLed after its first checkpoint and started again."""
    for old in ("store-uninterrupted", "work-uninterrupted", "store-killed", "work-killed"):
        shutil.rmtree(work / old, ignore_errors=True)  # a committed run of an earlier invocation would be reused
    base = cpt_arguments(model, drop, selection, RESUME_STEPS, seq_len, 2) + ["--save-steps", str(RESUME_SAVE), "--warmup-steps", "1"]
    runs = {"uninterrupted": ["--store", str(work / "store-uninterrupted"), "--work-dir", str(work / "work-uninterrupted")]}
    runs["killed"] = ["--store", str(work / "store-killed"), "--work-dir", str(work / "work-killed")]
    uninterrupted = Row("resume", f"uninterrupted, {RESUME_STEPS} steps")
    resumed = Row("resume", f"SIGKILL after the step-{RESUME_SAVE} checkpoint, then run again")
    difference = Row("resume", "final loss: resumed - uninterrupted")
    tolerance = RESUME_TOLERANCE[device]
    difference.notes = f"tolerance {tolerance:g} relative ({'fp32 CPU: bit-identical expected' if device == 'cpu' else 'bf16 CUDA'})"
    losses = {}
    try:
        uninterrupted.seconds, _ = run_child("stages.cpt", base + runs["uninterrupted"], work, "resume-uninterrupted")
        losses["uninterrupted"] = metrics_of(work / "store-uninterrupted")[-1]["loss"]
    except SystemExit as exc:
        uninterrupted.status, uninterrupted.notes = "FAILED", _failure(work, "resume-uninterrupted", exc)
    killed_after = kill_after_checkpoint(base + runs["killed"], work / "work-killed", RESUME_SAVE, work / "resume-killed.log")
    if killed_after is None:
        resumed.status, resumed.notes = "FAILED", f"the run ended before its step-{RESUME_SAVE} checkpoint could be killed; see {work}"
    else:
        try:
            resumed.seconds, _ = run_child("stages.cpt", base + runs["killed"], work, "resume-resumed")
        except SystemExit as exc:
            resumed.status, resumed.notes = "FAILED", _failure(work, "resume-resumed", exc)
        else:
            step = training_record(work / "store-killed")["resumed_from_step"]
            resumed.notes = f"killed after {killed_after:.1f} s; resumed from step {step}"
            if step == RESUME_SAVE:
                losses["resumed"] = metrics_of(work / "store-killed")[-1]["loss"]
            else:  # from scratch, or from a later checkpoint than the one it was killed after
                resumed.status, resumed.notes = "FAILED", f"{resumed.notes}, not from step {RESUME_SAVE}"
    for row, key in ((uninterrupted, "uninterrupted"), (resumed, "resumed")):
        if key in losses:
            row.loss, row.values = f"{losses[key]:.6f}", {"final_loss": losses[key]}
    if len(losses) < 2:
        difference.status = "FAILED"
    else:
        delta = losses["resumed"] - losses["uninterrupted"]
        difference.loss, difference.values = f"{delta:+.2e}", {"difference": delta, "tolerance": tolerance}
        if abs(delta) > tolerance * abs(losses["uninterrupted"]):
            difference.status = "FAILED"
    return _progress([uninterrupted, resumed, difference])


def kill_after_checkpoint(argv: list[str], work_dir: Path, step: int, log: Path) -> float | None:
    """Start `python -m stages.cpt argv`, SIGKILL it once the checkpoint of `step` is complete; seconds it ran.

    None when the process ended by itself first (nothing was interrupted).
    """
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "stages.cpt", *argv], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        while process.poll() is None:
            if any(work_dir.glob(f"*/checkpoints/step-{step}/complete.json")):  # written last (checkpoints.publish_checkpoint)
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return time.perf_counter() - started
            time.sleep(0.02)
    return None


# ---- the table -------------------------------------------------------------------------------------------------


def markdown(rows: list[Row]) -> list[str]:
    lines = [
        "| section | case | status | seconds (scan, resume: process; train: s/step) | × baseline | peak MiB | × baseline "
        "| planned MiB | planned / peak | loss | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row.section, row.case, row.status, _number(row.seconds, 3), _number(row.time_ratio, 2), _number(row.peak_mib, 0),
            _number(row.memory_ratio, 2), _number(row.planned_mib, 0), _number(row.planned_ratio, 2), row.loss,
            row.notes.replace("|", "/").replace("\n", " "),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _header(
    device: str, model: Path, shape: Shape, seq_len: int, steps: int, resume_model: Path | None, resume_seq: int
) -> list[str]:  # fmt: skip
    import torch

    from stages.training.memory_plan import load_config, meta_model

    parameters = sum(p.numel() for p in meta_model(load_config(model)).parameters())
    if device == "cuda":
        where = (
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; training bf16; peak MiB: GPU memory "
            "(torch.cuda.max_memory_allocated: the scan children's own, training as cpt's loop records it)"
        )
    else:
        where = (
            f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}; training fp32 (no bf16 on the CPU), no GPU memory: "
            "peak MiB is each child's peak RSS (runtime included, so planned / peak is not the planner's accuracy here)"
        )
    lines = [
        "GPU acceptance (benchmarks/gpu_acceptance.py)",
        where,
        f"scan and training model: {model.name} ({parameters / 1e6:.1f}M parameters, bf16 checkpoint, warm page cache); "
        f"training: seq {seq_len}, micro-batch 1, {steps} steps, median step time after 2 warm-up steps; baselines: "
        "the reference scan, full fine-tuning of the same setup",
    ]
    if resume_model is not None:
        lines.append(
            f"resume: {resume_model.name}, Spectrum-25, ZeRO-2, seq {resume_seq}, {RESUME_STEPS} steps, checkpoint every {RESUME_SAVE}"
        )
    return lines


def _progress(rows: list[Row]) -> list[Row]:
    """Each row on stderr as it is measured, so a run stopped by a time limit still shows what it finished."""
    for row in rows:
        numbers = ", ".join(f"{k} {_number(v, 3)}" for k, v in (("s", row.seconds), ("peak MiB", row.peak_mib)) if v is not None)
        line = f"[{time.strftime('%H:%M:%S')}] {row.section} / {row.case}: {row.status} {numbers} {row.loss} {row.notes}"
        print(line, file=sys.stderr, flush=True)
    return rows


def _shape(text: str) -> Shape:
    try:
        layers, hidden, intermediate, vocab = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYERS,HIDDEN,INTERMEDIATE,VOCAB (four integers), got {text!r}") from None
    if min(layers, hidden, intermediate, vocab) < 1 or hidden % 64:
        raise argparse.ArgumentTypeError(f"every number must be positive and HIDDEN a multiple of 64 (the head size), got {text!r}")
    return Shape(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab)


def _failure(work: Path, label: str, exc: SystemExit) -> str:
    """The child's error: the last line of its log, and where the log is."""
    log = work / f"{label}.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return f"{lines[-1].strip() if lines else exc} (log: {log})"


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _number(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
