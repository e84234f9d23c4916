"""benchmarks/gpu_acceptance.py end to end on the CPU with tiny models: every section and row, finite numbers, resume agrees.

The GPU numbers themselves come from running the script on a GPU; this keeps the script working without one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_acceptance
from benchmarks.gpu_acceptance import DEFAULT_SETUPS, RESUME_SAVE, RESUME_TOLERANCE, TRAIN_ARMS

from .helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ("seconds", "time_ratio", "peak_mib", "memory_ratio")


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (row["section"], row["case"], key, value)


@pytest.mark.integration
def test_the_tiny_run_on_the_cpu_fills_every_row(tmp_path):
    work = tmp_path / "acceptance"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu", "--tiny", "--workdir", str(work)]
    env = child_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch-extensions"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)  # a hang guard, no timing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    document = json.loads((work / "acceptance.json").read_text())
    assert document["failed"] == 0
    rows = {(row["section"], row["case"]): row for row in document["rows"]}
    training = [(f"train {setup}", arm) for setup in DEFAULT_SETUPS for arm in TRAIN_ARMS]
    scan = [("scan", "I/O floor: read every tensor"), ("scan", "reference approach"), ("scan", "ours (python -m stages.snr_scan)")]
    resume = [key for key in rows if key[0] == "resume"]
    assert list(rows) == [*scan, *training, *resume] and len(resume) == 3

    for key in scan:
        assert rows[key]["status"] == "ok"
        positive(rows[key], *MEASURED)
    assert "the I/O floor" in rows[scan[2]]["notes"] and "of the reference" in rows[scan[2]]["notes"]
    for key in training:
        if key == ("train ZeRO-3 + checkpointing", f"lora-{gpu_acceptance.LORA_RANK}"):  # the stage refuses LoRA at ZeRO-3
            assert rows[key]["status"] == "n/a" and "ZeRO 0-2" in rows[key]["notes"]
            continue
        assert rows[key]["status"] == "ok", rows[key]
        positive(rows[key], *MEASURED, "planned_mib", "planned_ratio")
        assert rows[key]["values"]["first_loss"] > 0 and "->" in rows[key]["loss"]
    for setup in DEFAULT_SETUPS:
        assert rows[(f"train {setup}", "full")]["time_ratio"] == 1.0

    uninterrupted, resumed, difference = (rows[key] for key in resume)
    assert all(row["status"] == "ok" for row in (uninterrupted, resumed, difference))
    assert f"resumed from step {RESUME_SAVE}" in resumed["notes"]
    first, second = uninterrupted["values"]["final_loss"], resumed["values"]["final_loss"]
    assert math.isfinite(first) and abs(second - first) <= RESUME_TOLERANCE["cpu"] * abs(first)
    assert difference["values"]["difference"] == second - first

    table = (work / "acceptance.md").read_text()
    assert table.strip() in done.stdout  # one table, printed and written
    assert "fp32" in table and "peak RSS" in table  # the CPU's header says what was measured
    assert all(f"| {section} | {case} |" in table for section, case in rows)


@pytest.mark.integration
def test_a_child_that_fails_is_a_failed_row_with_its_error(tiny_model, tmp_path):
    """A damaged shard fails all three scan children: three FAILED rows naming the error, and no crash."""
    model = tmp_path / "damaged"
    shutil.copytree(tiny_model, model)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    rows = gpu_acceptance.scan_rows(tmp_path, model, tmp_path / "snr.parquet", "cpu")
    assert [row.status for row in rows] == ["FAILED"] * 3
    assert all(f"(log: {tmp_path}" in row.notes and row.seconds is None for row in rows)
    ours = rows[2].notes
    assert "model.safetensors" in ours and "Traceback" not in ours, ours  # the stage's own error line
    assert all(line.count("|") == 12 for line in gpu_acceptance.markdown(rows)[2:])


def test_steps_below_one_are_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_acceptance.main(["--steps", "0", "--device", "cpu"])
    assert stopped.value.code == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    assert gpu_acceptance.main(["--device", "cuda"]) == 2
    assert "no CUDA device here; run with --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "4,128,256"], "expected LAYERS,HIDDEN,INTERMEDIATE,VOCAB (four integers), got '4,128,256'"),
        (["--shape", "4,100,256,512"], "HIDDEN a multiple of 64"),
        (["--shape", "0,128,256,512"], "every number must be positive"),
        (["--seq-len", "1"], "--seq-len must be at least 2, got 1"),
        (["--sections", "plan"], "invalid choice: 'plan'"),
        (["--setups", "ZeRO-4"], "invalid choice: 'ZeRO-4'"),
    ],
)
def test_a_bad_shape_sequence_or_section_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_acceptance.main(["--device", "cpu", *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_the_training_section_alone_on_another_shape(tmp_path):
    """--sections train --setups --shape --seq-len: only those training rows, on that model, planned at that sequence length."""
    work = tmp_path / "acceptance"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu", "--workdir", str(work),
        "--sections", "train", "--setups", "ZeRO-1", "--shape", "4,128,256,512", "--seq-len", "32", "--steps", "3",
    ]  # fmt: skip
    env = child_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch-extensions"))
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)  # a hang guard, no timing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((work / "acceptance.json").read_text())
    assert {row["section"] for row in document["rows"]} == {"train ZeRO-1"}  # not the default setups
    assert "model-l4-h128-i256-v512-bfloat16" in document["header"][2] and "seq 32" in document["header"][2]
    assert not any(line.startswith("resume:") for line in document["header"])
    for row in document["rows"]:
        assert row["status"] in ("ok", "n/a"), row
        if row["status"] == "ok":
            positive(row, "seconds", "peak_mib", "planned_mib")
    assert not (work / "resume").exists() and not (work / "reference-snr.json").exists()  # neither other section ran
