"""`spectrum evaluate` refuses bad options and inputs before measuring anything: one `error:` line naming what was wrong,
exit 2 (4 for an existing output), and nothing in the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages import evaluate
from stages.base.settings import STORE_ENV
from stages.evaluation.corpus import python_docs
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer

from .helpers import TINY, stage_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer of its own (no chat template)."""
    texts = domain_corpus(60, seed=3) + python_docs().texts[:80]
    folder = write_synthetic_model(tmp_path_factory.mktemp("evalrefuse") / "model", SyntheticSpec(**TINY))
    return write_tokenizer(folder, texts, TINY["vocab_size"])


def refused(capsys, store: Path, *argv: str, code: int = 2) -> str:
    """The one error line of `spectrum evaluate ARGV --store STORE`, checked to leave the store without a run."""
    exit_code, _, err = stage_cli(capsys, evaluate.STAGE, *argv, "--store", str(store), "--no-progress")
    assert exit_code == code, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (store / "runs").exists() or not any((store / "runs").iterdir()), "a refused evaluation left a run behind"
    return err


def test_without_a_store_it_names_store_and_its_variable(model, capsys, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    code, _, err = stage_cli(capsys, evaluate.STAGE, str(model), "--no-snr-drift")
    assert code == 2 and err.startswith("error: no artifact store: the evaluate stage"), err
    assert "--store" in err and STORE_ENV in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpt-run", "a", "--sft-run", "b"], "pass --cpt-run or --sft-run, not both"),
        ([], "nothing to evaluate: pass MODEL, --cpt-run RUN or --sft-run RUN"),
        (["MODEL", "--seq-len", "1"], "--seq-len is too small: 1"),
        (["MODEL", "--max-tokens", "0"], "--max-tokens is too small: 0"),
        (["MODEL", "--batch-size", "0"], "--batch-size is too small: 0"),
        (["MODEL", "--device", "gpu"], "unknown --device 'gpu'; use cpu, cuda, cuda:N or auto"),
        (["MODEL", "--task", "plant_mc"], "--task needs --tasks-dir"),
        (["MODEL", "--task", "plant_mc", "--tasks-dir", "NOWHERE"], "--task needs --tasks-dir"),
    ],
)
def test_bad_options_are_refused_before_any_work(model, tmp_path, capsys, argv, message):
    argv = [str(model) if a == "MODEL" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    err = refused(capsys, tmp_path / "store", *argv)
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_refused(model, tmp_path, capsys):
    err = refused(capsys, tmp_path / "store", str(model), "--device", "cuda")
    assert "--device cuda was asked for but no CUDA GPU is available" in err


def test_an_existing_evaluation_json_is_kept_without_overwrite(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "evaluation.json").write_text("precious")
    err = refused(capsys, tmp_path / "store", str(model), "--out-dir", str(out), code=4)
    assert str(out / "evaluation.json") in err and "--overwrite" in err
    assert (out / "evaluation.json").read_text() == "precious"


def test_an_out_dir_that_is_a_file_is_refused(model, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    err = refused(capsys, tmp_path / "store", str(model), "--out-dir", str(a_file))
    assert str(a_file) in err and "is a file, not a folder" in err
    assert a_file.read_text() == "x"


def model_without(source: Path, target: Path, *names: str) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in names:
            (target / path.name).write_bytes(path.read_bytes())
    return target


@pytest.mark.parametrize("which", ["model", "base"])
def test_a_model_folder_that_cannot_be_used_is_named(model, tmp_path, capsys, which):
    """The model and the base model are checked alike: missing, without weights, without a tokenizer."""
    no_weights = model_without(model, tmp_path / "no-weights", "model.safetensors")
    no_tokenizer = model_without(model, tmp_path / "no-tokenizer", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    what = "the model" if which == "model" else "the base model"
    cases = [
        (tmp_path / "missing", f"{what} {tmp_path / 'missing'} cannot be used"),
        (no_weights, f"{what} {no_weights} has no weights (*.safetensors)"),
        (no_tokenizer, f"{no_tokenizer} has no tokenizer"),
    ]
    for folder, message in cases:
        argv = [str(folder)] if which == "model" else [str(model), "--base-model", str(folder)]
        err = refused(capsys, tmp_path / "store", *argv, "--no-snr-drift")
        assert message in err, (folder, err)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("option", ["--data", "--general"])
def test_a_text_dataset_that_is_missing_or_empty_is_named(model, tmp_path, capsys, option):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    other_field = write_jsonl(tmp_path / "other" / "rows.jsonl", [{"body": "no text field"}])
    cases = [
        (tmp_path / "nowhere.jsonl", f"{tmp_path / 'nowhere.jsonl'} does not exist; pass a text file or folder"),
        (empty, f"{empty} holds no documents: the evaluation set is empty"),
        (other_field, f"{other_field}, line 1 has no 'text' text field (it has: body); pass --text-field NAME"),
    ]
    for path, message in cases:
        err = refused(capsys, tmp_path / "store", str(model), option, str(path), "--no-snr-drift")
        assert message in err, (path, err)


def test_chat_data_that_is_not_chat_rows_is_named(model, tmp_path, capsys):
    empty_folder = tmp_path / "empty-folder"
    empty_folder.mkdir()
    no_rows = write_jsonl(tmp_path / "no-rows" / "chats.jsonl", [])
    not_chat = write_jsonl(tmp_path / "not-chat" / "chats.jsonl", [{"text": "plain text"}])
    no_answer = write_jsonl(tmp_path / "no-answer" / "chats.jsonl", [{"messages": [{"role": "user", "content": "hello?"}]}])
    cases = [
        (empty_folder, f"the chat data {empty_folder} is empty"),
        (no_rows, "holds no chat rows: the evaluation set is empty"),
        (not_chat, "is not a chat row: it needs `messages` or `prompt` and `completion`"),
        (no_answer, "has no assistant turn"),
    ]
    for path, message in cases:
        err = refused(capsys, tmp_path / "store", str(model), "--chat-data", str(path), "--no-snr-drift")
        assert message in err, (path, err)


def test_chat_data_needs_a_chat_template(model, tmp_path, capsys):
    chats = write_jsonl(tmp_path / "chats" / "chats.jsonl", [{"prompt": "Is the pump fine?", "completion": "Yes."}])
    err = refused(capsys, tmp_path / "store", str(model), "--chat-data", str(chats), "--no-snr-drift")
    assert "the trained model's tokenizer has no chat template; pass --chat-template FILE" in err
    missing = tmp_path / "missing.jinja"
    err = refused(capsys, tmp_path / "store", str(model), "--chat-data", str(chats), "--chat-template", str(missing), "--no-snr-drift")
    assert f"--chat-template {missing} does not exist" in err
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(bytes(range(256)))
    err = refused(capsys, tmp_path / "store", str(model), "--chat-data", str(chats), "--chat-template", str(binary), "--no-snr-drift")
    assert f"--chat-template {binary} is not UTF-8 text" in err
