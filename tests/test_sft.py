"""sft: chat rows, loss on assistant tokens only (checked on the label tensor), real DeepSpeed on the CPU."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import sft
from stages.base.contracts import SFT
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import EOS, domain_corpus, write_tokenizer
from stages.store import open_store
from stages.training.chat import IGNORE, prepare_chat, tokenize_conversation

from .helpers import TINY

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    corpus = domain_corpus(200) + ["<|user|> <|assistant|> what is the status? report."]
    folder = write_synthetic_model(tmp_path_factory.mktemp("chat") / "model", SyntheticSpec(**TINY))
    write_tokenizer(folder, corpus, TINY["vocab_size"])
    return folder


@pytest.fixture
def template(tmp_path) -> Path:
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


def write_rows(folder: Path, rows: list[dict], name: str = "chat.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def chat_rows(count: int) -> list[dict]:
    corpus = domain_corpus(count, seed=3)
    rows = []
    for index, answer in enumerate(corpus):
        if index % 2:
            rows.append({"prompt": "what is the status?", "completion": answer})
        else:
            rows.append({"messages": [{"role": "user", "content": "report."}, {"role": "assistant", "content": answer}]})
    return rows


def tokenizer_with(chat_model: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_labels_cover_exactly_the_assistant_turns(chat_model):
    tokenizer = tokenizer_with(chat_model)
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "what is the status?"},
        {"role": "assistant", "content": "the pump holds nominal pressure."},
        {"role": "user", "content": "and the valve?"},
        {"role": "assistant", "content": "valve seven returns to its set point."},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages, "row 1")
    assert len(ids) == len(labels)
    learned = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert learned == f"the pump holds nominal pressure.{EOS}\nvalve seven returns to its set point.{EOS}\n"
    masked = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE])
    assert "what is the status?" in masked and "be brief." in masked and "pump" not in masked


def test_prepared_rows_pad_with_ignored_labels(chat_model, tmp_path):
    tokenizer = tokenizer_with(chat_model)
    data = prepare_chat(write_rows(tmp_path / "chat", chat_rows(40)), tokenizer, seq_len=96, heldout_percent=10)
    arrays = data.arrays
    assert arrays.input_ids.shape == arrays.labels.shape == arrays.attention_mask.shape
    assert arrays.input_ids.shape[1] == 96 and data.record["training_rows"] + data.record["rows"] == 40
    batch = arrays.batch([0, 1])
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE)
    assert torch.all((batch["labels"] == IGNORE) | (batch["labels"] == batch["input_ids"]))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": [{"role": "user", "content": "hi"}]}], "chat.jsonl, line 1 has no assistant turn"),
        ([{"text": "plain"}], r"chat.jsonl, line 1 is not a chat row: it needs `messages` or `prompt` and `completion` \(it has: text\)"),
        ([{"messages": [{"role": "user"}]}], "every message needs a string `role` and `content`"),
    ],
)
def test_bad_chat_rows_are_clear_errors(chat_model, tmp_path, rows, message):
    with pytest.raises(InputError, match=message):
        prepare_chat(write_rows(tmp_path / "chat", rows), tokenizer_with(chat_model), seq_len=64, heldout_percent=0)


def test_a_tokenizer_without_a_chat_template_needs_one(chat_model, tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(InputError, match="no chat template; pass --chat-template"):
        prepare_chat(write_rows(tmp_path / "chat", chat_rows(4)), AutoTokenizer.from_pretrained(str(chat_model)), 64, 0)


@pytest.mark.integration
def test_sft_trains_the_selection_on_assistant_tokens(chat_model, template, tmp_path):
    selection = tmp_path / "sel.yaml"
    selection.write_text("unfrozen_parameters:\n- model.layers.1.mlp\n- ^lm_head.weight$\n")
    config = sft.SftConfig(
        model=str(chat_model), data=str(write_rows(tmp_path / "chat", chat_rows(80))), selection=str(selection),
        chat_template=str(template), max_steps=6, seq_len=96, micro_batch_size=2, learning_rate=2e-3, warmup_steps=1, save_steps=3,
    )  # fmt: skip
    result = sft.run(config, StageContext(open_store(str(tmp_path / "store")), work_dir=tmp_path / "work", progress=False))
    losses = [row["loss"] for row in result.detail.metrics]
    assert len(losses) == 6 and losses[-1] < losses[0]
    before = load_file(str(chat_model / "model.safetensors"))
    after = load_file(str(tmp_path / "store" / "runs" / result.run_id / SFT / "model" / "model.safetensors"))
    trainable = set(result.detail.freeze.trainable)
    assert trainable == {"lm_head.weight", *(f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    assert all(torch.equal(after[n], t) != (n in trainable) for n, t in before.items())
    assert result.manifest.parameters["chat_template"] == TEMPLATE
    heldout = json.loads((tmp_path / "store" / "runs" / result.run_id / SFT / "heldout.json").read_text())
    assert heldout["training_rows"] + heldout["rows"] == 80


def test_a_missing_or_binary_chat_template_is_a_clear_error(chat_model, tmp_path):
    binary = tmp_path / "template.jinja"
    binary.write_bytes(bytes(range(256)))
    data = write_rows(tmp_path / "chat", chat_rows(4))
    for path, message in ((tmp_path / "nowhere.jinja", "does not exist"), (binary, "is not UTF-8 text")):
        config = sft.SftConfig(model=str(chat_model), data=str(data), full=True, chat_template=str(path))
        with pytest.raises(InputError, match=f"--chat-template .*{message}"):
            sft.run(config, StageContext(open_store(str(tmp_path / "store")), progress=False))
    with pytest.raises(InputError, match=r"--heldout-percent must be in \[0, 100\)"):
        sft.run(
            sft.SftConfig(model=str(chat_model), data=str(data), full=True, heldout_percent=-1),
            StageContext(open_store(str(tmp_path / "store"))),
        )
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.integration
def test_rescan_selects_for_the_trained_model_as_steps_of_the_run(chat_model, template, tmp_path):
    """The cpt output stands in as a model of the same structure with other weights."""
    from stages import layer_select, snr_scan
    from stages.store import load_manifest

    store = open_store(str(tmp_path / "store"))
    base = StageContext(store, run_id="base", progress=False)
    scan = snr_scan.run(snr_scan.ScanConfig(model_dir=str(chat_model), estimator="gavish-donoho"), base)
    layer_select.run(layer_select.SelectConfig(snr_run="base", top_percent=50.0, depth_aware=True), base)
    trained = tmp_path / "trained"
    shutil.copytree(chat_model, trained)
    write_synthetic_model(trained, SyntheticSpec(**TINY, seed=7))
    config = sft.SftConfig(
        model=str(trained), data=str(write_rows(tmp_path / "chat", chat_rows(40))), selection_run="base", rescan=True,
        chat_template=str(template), max_steps=2, seq_len=96, micro_batch_size=2, save_steps=0,
    )  # fmt: skip
    result = sft.run(config, StageContext(store, run_id="tuned", work_dir=tmp_path / "work", progress=False))

    rescan = load_manifest(store, "tuned", "snr_scan.sft")
    reselect = load_manifest(store, "tuned", "layer_select.sft")
    assert rescan.parameters == {**scan.manifest.parameters, "model_id": "trained"}
    assert rescan.parameters["estimator"] == "gavish-donoho"
    assert {ref["sha256"] for ref in rescan.inputs} != {ref["sha256"] for ref in scan.manifest.inputs}
    policy = load_manifest(store, "base", "layer_select").parameters
    assert reselect.parameters == policy and policy["depth_aware"] is True
    assert [ref["uri"] for ref in reselect.inputs] == [o["uri"] for o in rescan.outputs if "/snr/" in o["uri"]]
    selected = json.loads((tmp_path / "store" / "runs" / "tuned" / "layer_select.sft" / "selection.json").read_text())
    assert set(result.detail.freeze.trainable) == set(selected["trainable_tensors"])
    assert result.manifest.inputs[-1]["uri"].endswith("runs/tuned/layer_select.sft/selection.json")
    assert result.manifest.environment["libraries"]["deepspeed"] and result.manifest.environment["device"].startswith("cpu")
    assert [line.split(":")[0] for line in result.lines if line.startswith(("snr_scan", "layer_select"))] == [
        "snr_scan.sft",
        "layer_select.sft",
    ]


def test_rescan_needs_a_selection_that_records_its_policy(chat_model, tmp_path):
    selection = tmp_path / "sel.yaml"
    selection.write_text("unfrozen_parameters:\n- model.layers.1.mlp\n")
    data = write_rows(tmp_path / "chat", chat_rows(4))
    context = StageContext(open_store(str(tmp_path / "store")), progress=False)
    with pytest.raises(InputError, match="unfrozen_parameters YAML, which does not record it"):
        sft.run(sft.SftConfig(model=str(chat_model), data=str(data), selection=str(selection), rescan=True), context)
    with pytest.raises(InputError, match="cannot be combined with --full"):
        sft.run(sft.SftConfig(model=str(chat_model), data=str(data), full=True, rescan=True), context)
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.integration
def test_gradient_accumulation_weighs_every_answer_token_alike(chat_model):
    """Two rows with unequal answers: as one micro-batch of 2 or as 2 accumulated micro-batches of 1, the same loss and update."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.training import loop
    from stages.training.freezing import apply_selection
    from stages.training.settings import TrainSettings

    tokenizer = AutoTokenizer.from_pretrained(str(chat_model))
    tokenizer.chat_template = TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "report."}, {"role": "assistant", "content": a}]} for a in domain_corpus(8, seed=3)]
    with tempfile.TemporaryDirectory() as folder:
        chat = prepare_chat(write_rows(Path(folder) / "chat", rows), tokenizer, 384, 0.0)
        answers = [int((chat.arrays.labels[row] != IGNORE).sum()) for row in range(len(rows))]
        assert len(set(answers)) > 1  # the rows differ in how many tokens are learnt
        results = []
        for micro_batch, accumulation in ((2, 1), (1, 2)):
            model = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32)
            model.config.use_cache = False
            apply_selection(model, None)
            settings = TrainSettings(
                max_steps=1, micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation, learning_rate=1e-4,
                warmup_steps=0, weight_decay=0.0, seed=0, save_steps=0, zero_stage=2, bf16=False, offload_optimizer=False,
                offload_params=False,
            )  # fmt: skip
            results.append(loop.train(model, chat.arrays, settings, Path(folder) / f"ck-{micro_batch}", progress=False).metrics[0])
    one, accumulated = results
    assert accumulated["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
