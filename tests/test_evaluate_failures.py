"""`spectrum evaluate` on models it cannot measure or compare: a diverged model (exit 3) and a base that is not the trained
model's base (exit 2) fail as one error line; the run records a failed evaluate with no outputs, and no evaluation is stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages import evaluate
from stages.base.contracts import EVALUATE, FAILED, SUCCEEDED
from stages.evaluation.corpus import python_docs
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, load_manifest, open_store

from .helpers import TINY, stage_cli

FAST = ["--seq-len", "32", "--max-tokens", "256", "--no-progress"]
TEXTS = domain_corpus(60, seed=3) + python_docs().texts[:80]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = write_synthetic_model(tmp_path_factory.mktemp("evalfail") / "model", SyntheticSpec(**TINY))
    return write_tokenizer(folder, TEXTS, TINY["vocab_size"])


def with_tensor(source: Path, target: Path, name: str, change) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def failed(capsys, tmp_path: Path, code: int, *argv: str) -> str:
    """The error line of a failed evaluation, checked to have stored no evaluation and to record the failure."""
    out = tmp_path / "out"
    exit_code, _, err = stage_cli(capsys, evaluate.STAGE, *argv, "--store", str(tmp_path / "store"), "--out-dir", str(out), *FAST)
    assert exit_code == code, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    store = open_store(str(tmp_path / "store"))
    (run_id,) = [r for r, stages in list_runs(store).items() if EVALUATE in stages]
    manifest = load_manifest(store, run_id, EVALUATE)
    assert manifest.status == FAILED and manifest.outputs == []
    assert not [key for key in store.list("") if "evaluation" in key], "a failed evaluation stored (part of) its results"
    assert not out.exists()
    return err


NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("which", ["trained", "base"])
def test_a_model_with_non_finite_weights_exits_3_naming_the_model_and_tensor(model, tmp_path, capsys, which):
    diverged = with_tensor(model, tmp_path / "nan", NAN_TENSOR, lambda t: torch.full_like(t, float("nan")))
    trained, base = (diverged, model) if which == "trained" else (model, diverged)
    err = failed(capsys, tmp_path, 3, str(trained), "--base-model", str(base), "--no-snr-drift")
    assert f"the {which} model {diverged} has NaN or Inf values in {NAN_TENSOR}: it diverged in training or is damaged" in err
    assert "evaluate an earlier checkpoint" in err


def test_finite_weights_whose_loss_overflows_exit_3(model, tmp_path, capsys):
    huge = with_tensor(model, tmp_path / "huge", "lm_head.weight", lambda t: t * 1e30)
    err = failed(capsys, tmp_path, 3, str(huge), "--no-snr-drift")
    assert "the trained model's loss on python-docs is not finite" in err and "the model has diverged" in err


def test_a_base_with_other_matrices_is_refused_and_its_scans_are_kept(model, tmp_path, capsys):
    one_layer = write_synthetic_model(tmp_path / "one-layer", SyntheticSpec(**{**TINY, "num_hidden_layers": 1}))
    write_tokenizer(one_layer, TEXTS, TINY["vocab_size"])  # the same tokenizer: the tokens compare, the matrices do not
    err = failed(capsys, tmp_path, 2, str(model), "--base-model", str(one_layer))
    assert "the base and trained models have different matrices (e.g. model.layers.1." in err and "not a model and its training" in err
    store = open_store(str(tmp_path / "store"))
    (run_id,) = list_runs(store)
    scans = [s for s in list_runs(store)[run_id] if s.startswith("snr_scan.")]
    assert sorted(scans) == ["snr_scan.evaluate", "snr_scan.evaluate_base"]
    assert all(load_manifest(store, run_id, s).status == SUCCEEDED for s in scans)  # reusable by the next evaluation
