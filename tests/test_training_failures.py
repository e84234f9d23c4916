"""Training that must fail cleanly: divergence, non-finite options, an existing --out-dir, a full disk, an endless template."""

from __future__ import annotations

import errno
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from spectrum_cli.main import main
from stages import cpt, sft
from stages.base.contracts import CPT
from stages.base.errors import InputError, OutputExistsError
from stages.store import list_runs, load_manifest, open_store
from stages.training import loop
from stages.training.chat import _StepBudget

from .test_cpt import base_model, config, context, corpus, drop, selection, sha  # noqa: F401  (fixtures)
from .test_sft import chat_model, chat_rows, write_rows  # noqa: F401  (fixtures)


def cli_args(base_model: Path, drop: Path, selection: Path, tmp_path: Path, *extra: str) -> list[str]:  # noqa: F811
    args = ["cpt", str(base_model), "--data", str(drop), "--selection", str(selection), "--store", str(tmp_path / "store")]
    args += ["--work-dir", str(tmp_path / "work"), "--seq-len", "64", "--warmup-steps", "0", "--no-progress", *extra]
    return args


def test_a_learning_rate_beyond_fp32_is_refused(base_model, drop, selection, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match=r"^--learning-rate 1e\+300 is beyond the optimizer's fp32 range \(3.4e\+38\); lower it$"):
        cpt.run(config(base_model, drop, selection=str(selection), learning_rate=1e300), context(tmp_path / "store", tmp_path / "work"))


def no_runs(tmp_path: Path) -> bool:
    return not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


# --- options checked before any work -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("learning_rate", float("inf")), ("learning_rate", float("nan")), ("weight_decay", float("nan")), ("heldout_percent", float("nan"))],
)
def test_a_non_finite_float_option_is_refused_naming_it(base_model, drop, selection, tmp_path, option, value):  # noqa: F811
    flag = "--" + option.replace("_", "-")
    with pytest.raises(InputError, match=f"^{flag} must be a finite number, got {value!r}$"):
        cpt.run(config(base_model, drop, selection=str(selection), **{option: value}), context(tmp_path / "store", tmp_path / "work"))
    assert no_runs(tmp_path)


def test_an_existing_out_dir_is_refused_before_any_work(base_model, drop, selection, tmp_path, capsys):  # noqa: F811
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_bytes(b"an earlier model")
    assert main(cli_args(base_model, drop, selection, tmp_path, "--out-dir", str(taken))) == OutputExistsError.exit_code
    assert "already exists and is not empty; choose another folder or pass --overwrite" in capsys.readouterr().err
    assert no_runs(tmp_path) and not (tmp_path / "work").exists()
    afile = tmp_path / "a-file"
    afile.write_text("")
    with pytest.raises(InputError, match="--out-dir .*a-file is a file"):
        cpt.run(config(base_model, drop, selection=str(selection), out_dir=str(afile)), context(tmp_path / "store", tmp_path / "work"))


# --- divergence ----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_diverged_run_fails_at_its_first_non_finite_loss_and_is_never_reused(base_model, drop, selection, tmp_path, capsys):  # noqa: F811
    args = cli_args(base_model, drop, selection, tmp_path, "--learning-rate", "1e30", "--max-steps", "6", "--save-steps", "2")
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "error: training diverged at step 2 of 6: the loss is non-finite (--learning-rate 1e+30)" in err
    assert "lower --learning-rate" in err
    assert main(args) == 3  # not cached: trained again, and failed again
    store = open_store(str(tmp_path / "store"))
    runs = list_runs(store)
    assert len(runs) == 2 and all(load_manifest(store, run, CPT).status == "failed" for run in runs)
    assert not list((tmp_path / "store" / "runs").glob("*/cpt/checkpoints/*"))  # step 2's weights were never checkpointed


def test_non_finite_weights_are_named():
    settings = loop.TrainSettings(4, 1, 1, 1e-3, 0, 0.0, 0, 0, 2, False, False, False)
    tensors = {"fine": torch.ones(3), "a.weight": torch.tensor([1.0, float("inf")]), "b.weight": torch.tensor([float("nan")])}
    with pytest.raises(loop.TrainingDivergedError, match=r"diverged by step 4 of 4: tensor a.weight \(and 1 more\) holds NaN"):
        loop.require_finite_weights(tensors, 4, settings)


# --- a full disk ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_full_disk_while_saving_the_model_is_a_file_system_error(base_model, drop, selection, tmp_path, capsys, monkeypatch):  # noqa: F811
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # what safetensors raises

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert main(cli_args(base_model, drop, selection, tmp_path, "--max-steps", "1", "--save-steps", "0")) == 5
    err = capsys.readouterr().err
    assert "error: No space left on device:" in err and "free some space" in err
    store = open_store(str(tmp_path / "store"))
    (run,) = list_runs(store)
    assert load_manifest(store, run, CPT).status == "failed"


def test_torch_writer_failures_on_a_full_disk_are_enospc(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(100, 100, 0))
    with pytest.raises(OSError) as raised, loop.disk_errors(tmp_path / "checkpoints"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save's words
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="unrelated"), loop.disk_errors(tmp_path):  # other errors pass through as they are
        raise ValueError("unrelated")


# --- --out-dir -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_out_dir_is_written_after_the_commit_and_from_a_reused_run(base_model, drop, selection, tmp_path):  # noqa: F811
    trained = cpt.run(
        config(base_model, drop, selection=str(selection), max_steps=2, save_steps=0, out_dir=str(tmp_path / "a")),
        context(tmp_path / "store", tmp_path / "work"),
    )
    reused = cpt.run(
        config(base_model, drop, selection=str(selection), max_steps=2, save_steps=0, out_dir=str(tmp_path / "b")),
        context(tmp_path / "store", tmp_path / "work"),
    )
    assert reused.cached and reused.run_id == trained.run_id
    stored = tmp_path / "store" / "runs" / trained.run_id / CPT / "model" / "model.safetensors"
    assert sha(tmp_path / "a" / "model.safetensors") == sha(tmp_path / "b" / "model.safetensors") == sha(stored)
    assert not (tmp_path / "work" / trained.manifest.cache_key).exists()


# --- an endless chat template --------------------------------------------------------------------------


def test_a_chat_template_that_never_ends_is_stopped_naming_it(chat_model, tmp_path):  # noqa: F811
    template = tmp_path / "nested.jinja"
    template.write_text(
        "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    options = sft.SftConfig(
        model=str(chat_model), data=str(write_rows(tmp_path / "chat", chat_rows(4))), full=True, chat_template=str(template), seq_len=64
    )
    with pytest.raises(InputError, match=r"chat.jsonl, line 1: the chat template .*nested.jinja ran more than 2,000,000 template steps"):
        sft.run(options, context(tmp_path / "store", tmp_path / "work"))
    assert no_runs(tmp_path)
    assert not isinstance(sys.gettrace(), _StepBudget)  # the step counter is gone with the rendering


def test_trained_values_beyond_the_saved_dtype_are_refused_from_the_files(tmp_path):
    """A trained fp16 tensor that grew past 65504 is infinite once saved in the base model's dtype."""
    from safetensors.torch import save_file

    from stages.training.tensor_audit import audit_tensors

    before, after = tmp_path / "before", tmp_path / "after"
    for folder, value in ((before, 1.0), (after, 70000.0)):
        folder.mkdir()
        weights = {"w.weight": torch.full((2, 2), value).to(torch.float16), "frozen.weight": torch.ones(2, dtype=torch.float16)}
        save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(loop.TrainingDivergedError, match=r"NaN or infinite values in 1 tensor\(s\) \(w.weight \(F16\)\)"):
        audit_tensors(before, after, {"w.weight"})


def test_a_damaged_packed_data_cache_is_packed_again(base_model, drop, tmp_path, caplog):  # noqa: F811
    import logging
    import os

    from transformers import AutoTokenizer

    from stages.training.packing import pack

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    first = pack(drop, tokenizer, 64, 5.0, "text", tmp_path / "work", "digest")
    expected = first.blocks.copy()
    (blocks,) = (tmp_path / "work").glob("blocks-*.u32")
    os.truncate(blocks, 100)
    with caplog.at_level(logging.WARNING):
        again = pack(drop, tokenizer, 64, 5.0, "text", tmp_path / "work", "digest")
    assert (again.blocks == expected).all() and "packing the data again" in caplog.text
