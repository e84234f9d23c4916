"""The main job's output reads as one story: with --no-progress no library draws a bar, and stdout holds only our result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

from .helpers import REPO_ROOT, TINY, child_env

LIBRARY_NOISE = ("Loading weights", "Writing model shards", "[INFO]", "[WARNING]", "ds_accelerator", "DeepSpeed", "it/s]")


@pytest.mark.integration
def test_cpt_with_no_progress_prints_only_its_own_lines(tmp_path):
    corpus = domain_corpus(120)
    model = write_tokenizer(write_synthetic_model(tmp_path / "model", SyntheticSpec(**TINY)), corpus, TINY["vocab_size"])
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "part.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus))
    command = [sys.executable, "-m", "stages.cpt", str(model), "--data", str(drop), "--full", "--store", str(tmp_path / "store")]
    command += ["--work-dir", str(tmp_path / "work"), "--max-steps", "2", "--seq-len", "64", "--save-steps", "0", "--no-progress"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out_lines = done.stdout.strip().splitlines()
    assert out_lines[0].startswith("trained ") and out_lines[-1].startswith("cpt: committed run "), done.stdout
    assert len(out_lines) == 2, done.stdout
    for noise in LIBRARY_NOISE:
        assert noise not in done.stderr, (noise, done.stderr[-3000:])
