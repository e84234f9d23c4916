"""Resume is bit-identical at every checkpoint: a run stopped after step 3 or 6 of 12 ends with the weights of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages import cpt, sft
from stages.base.contracts import CPT, SFT
from stages.training import loop

from .test_cpt import base_model, config, context, corpus, drop, selection, sha  # noqa: F401  (fixtures)
from .test_sft import chat_model, chat_rows, template, write_rows  # noqa: F401  (fixtures)


def stopped_after(monkeypatch, done: int) -> None:
    """The next run stops (as Ctrl-C would) when it is about to train step `done` + 1."""
    real = loop._batch_rows

    def stop(count, settings, step, micro):
        if step == done:
            raise KeyboardInterrupt
        return real(count, settings, step, micro)

    monkeypatch.setattr(loop, "_batch_rows", stop)


def resumed_weights(run, options, tmp_path: Path, monkeypatch, stops: list[int], stage: str) -> tuple[str, int, list[float]]:
    """The sha256 of the model after the run was stopped after each step of `stops` in turn and then finished,
    the step it last resumed from and the losses of the steps it trained then (exact fp32 values: the saved model
    is in the base model's bf16, which could hide a difference in the last bits)."""
    real = loop._batch_rows
    for done in stops:
        stopped_after(monkeypatch, done)
        with pytest.raises(KeyboardInterrupt):
            run(options, context(tmp_path / "store", tmp_path / "work"))
        monkeypatch.setattr(loop, "_batch_rows", real)
    result = run(options, context(tmp_path / "store", tmp_path / "work"))
    weights = sha(tmp_path / "store" / "runs" / result.run_id / stage / "model" / "model.safetensors")
    return weights, result.detail.resumed_from_step, [row["loss"] for row in result.detail.metrics]


def reference(run, options, tmp_path: Path, stage: str, resumed_from: int) -> tuple[str, int, list[float]]:
    result = run(options, context(tmp_path / "reference", tmp_path / "work-reference"))
    weights = sha(tmp_path / "reference" / "runs" / result.run_id / stage / "model" / "model.safetensors")
    return weights, resumed_from, [row["loss"] for row in result.detail.metrics][resumed_from:]


@pytest.mark.integration
def test_cpt_resumed_after_steps_3_and_6_of_12_is_bit_identical(base_model, drop, selection, tmp_path, monkeypatch):  # noqa: F811
    options = config(base_model, drop, selection=str(selection), max_steps=12, save_steps=3, warmup_steps=4)
    expected = reference(cpt.run, options, tmp_path, CPT, 6)
    assert resumed_weights(cpt.run, options, tmp_path / "a", monkeypatch, [6], CPT) == expected
    assert resumed_weights(cpt.run, options, tmp_path / "b", monkeypatch, [3, 7], CPT) == expected


@pytest.mark.integration
def test_cpt_resumed_with_the_optimizer_offloaded_is_bit_identical(base_model, drop, selection, tmp_path, monkeypatch):  # noqa: F811
    """--offload-optimizer made DeepSpeed use its CPU Adam, whose bias correction after a resume differed in the last bits."""
    options = config(base_model, drop, selection=str(selection), max_steps=12, save_steps=3, warmup_steps=4, offload_optimizer=True)
    assert resumed_weights(cpt.run, options, tmp_path, monkeypatch, [6], CPT) == reference(cpt.run, options, tmp_path, CPT, 6)


@pytest.mark.integration
def test_sft_resumed_after_step_6_of_12_is_bit_identical(chat_model, template, tmp_path, monkeypatch):  # noqa: F811
    chosen = tmp_path / "sel.yaml"
    chosen.write_text("unfrozen_parameters:\n- model.layers.1.mlp\n- ^lm_head.weight$\n")
    options = sft.SftConfig(
        model=str(chat_model), data=str(write_rows(tmp_path / "chat", chat_rows(60))), selection=str(chosen),
        chat_template=str(template), max_steps=12, seq_len=96, micro_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=2e-3, warmup_steps=4, save_steps=3,
    )  # fmt: skip
    assert resumed_weights(sft.run, options, tmp_path / "a", monkeypatch, [6], SFT) == reference(sft.run, options, tmp_path, SFT, 6)


@pytest.mark.integration
def test_the_first_step_trains_at_its_scheduled_rate(base_model, drop, selection, tmp_path):  # noqa: F811
    """DeepSpeed's scheduler starts at rate 0 before its first iteration: without care, step 1 changes nothing."""
    from stages.base.contracts import TRAINED_TENSORS_TABLE
    from stages.store import open_store, read_table

    result = cpt.run(
        config(base_model, drop, selection=str(selection), max_steps=1, warmup_steps=0, save_steps=0),
        context(tmp_path / "store", tmp_path / "work"),
    )
    assert [row["learning_rate"] for row in result.detail.metrics] == [pytest.approx(2e-3)]
    table = read_table(open_store(str(tmp_path / "store")), TRAINED_TENSORS_TABLE, run_id=result.run_id).to_pylist()
    assert all(row["changed"] for row in table if row["trainable"])
