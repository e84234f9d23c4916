"""The memory planner: the model on the meta device, the components per device, the cheapest fit, the CLI, the pre-flight check."""

from __future__ import annotations

import argparse

import pytest
import torch

from stages.base.errors import InputError
from stages.training import loop, runner
from stages.training.freezing import apply_selection
from stages.training.memory_plan import (
    PlannedModel,
    Setup,
    cheapest_fit,
    meta_model,
    parse_size,
    trace_activations,
    trainable_of,
)
from stages.training.selection import Selection

SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def llama(**values):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", **{**SMALL, **values})


def planned(config, patterns: tuple[str, ...] | None) -> PlannedModel:
    skeleton = meta_model(config)
    apply_selection(skeleton, None if patterns is None else Selection(patterns, "test", {}))
    return PlannedModel(skeleton, trainable_of(skeleton, "test"))


def test_a_70b_config_plans_on_the_meta_device_and_zero3_shards_the_weights():
    model = planned(llama(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          vocab_size=128256), (r"model\.layers\.79\.",))
    assert next(model.skeleton.parameters()).device.type == "meta"
    assert 70.5e9 < model.trainable.total_parameters < 70.6e9
    one = model.plan(Setup(gpus=8, zero_stage=2, seq_len=4096))
    three = model.plan(Setup(gpus=8, zero_stage=3, seq_len=4096))
    assert one.weights == model.trainable.total_parameters * 2  # bf16, whole on every GPU
    assert three.weights == model.trainable.total_parameters * 2 // 8
    assert three.optimizer == model.trainable.trainable_parameters * 12 // 8  # fp32 master + two moments, sharded


def test_a_frozen_prefix_keeps_no_activations_and_trained_embeddings_reach_every_layer():
    upper = planned(llama(), (r"model\.layers\.3\.",)).activations(64, bf16=False)
    assert upper.layers[:3] == (0, 0, 0) and upper.layers[3] > 0
    embeddings = planned(llama(), (r"model\.embed_tokens\.", r"model\.layers\.3\.")).activations(64, bf16=False)
    assert all(embeddings.layers)
    assert embeddings.bytes(1, checkpointing=True) < embeddings.bytes(1, checkpointing=False)


def test_the_meta_trace_matches_what_autograd_saves_on_the_cpu():
    """Every tensor a real forward saves for backward (parameters aside, each storage once) against the meta-device trace."""
    from transformers import AutoModelForCausalLM

    config = llama()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (1, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    real = sum(kept.values())
    profile = trace_activations(planned(config, None).skeleton, 128, bf16=False)
    traced = sum(profile.layers) + profile.head
    assert 0.9 * real < traced < 1.15 * real, (traced, real)


def test_offload_moves_the_optimizer_state_and_parameters_to_the_host():
    model = planned(llama(), None)
    on_gpu = model.plan(Setup(zero_stage=3))
    offloaded = model.plan(Setup(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert offloaded.optimizer == 0 and offloaded.weights == 0
    assert offloaded.host == on_gpu.optimizer + on_gpu.weights + model.trainable.trainable_parameters * 4
    assert offloaded.total < on_gpu.total


def test_the_cheapest_fit_follows_the_order_of_preference():
    model = planned(llama(), None)
    roomy = cheapest_fit(model, Setup(micro_batch_size=4, seq_len=256), 2**40)
    assert (roomy.setup.zero_stage, roomy.setup.micro_batch_size, roomy.setup.gradient_checkpointing) == (0, 4, False)
    several = cheapest_fit(model, Setup(gpus=8, micro_batch_size=4, seq_len=256), 2**40)
    assert several.setup.zero_stage == 2  # ZeRO-0 is not offered on several GPUs
    tight = model.plan(Setup(zero_stage=3, gradient_checkpointing=True, micro_batch_size=1, seq_len=256))
    fit = cheapest_fit(model, Setup(micro_batch_size=4, seq_len=256), tight.total)
    assert fit is not None and fit.total <= tight.total
    assert cheapest_fit(model, Setup(seq_len=256), 1024) is None


def test_sizes_are_read_with_their_units_and_anything_else_is_one_error():
    assert parse_size("80GiB", "--gpu-memory") == 80 * 2**30
    assert parse_size("80 GB", "--gpu-memory") == 80 * 10**9
    assert parse_size("1.5MiB", "--gpu-memory") == 3 * 2**19
    for text in ("80 parsecs", "GiB", "0GiB", "-1GiB"):
        with pytest.raises(InputError, match="--gpu-memory"):
            parse_size(text, "--gpu-memory")


# --- the pre-flight check of cpt and sft ---------------------------------------------------------------


def test_the_training_pre_flight_check_refuses_with_the_plan(tmp_path, monkeypatch):
    """The one estimate in the code: the refusal names the planner's bytes (memory_estimate is gone)."""
    assert not hasattr(loop, "memory_estimate")
    llama().save_pretrained(tmp_path)
    config = runner.TrainingConfig(model=str(tmp_path), data="d", full=True, seq_len=64, zero_stage=0, precision="fp32")
    settings = runner._settings(config)
    skeleton = meta_model(llama())
    expected = PlannedModel(skeleton, trainable_of(skeleton, "full")).plan(Setup(1, 0, False, seq_len=64, device="cpu")).total
    monkeypatch.setattr(loop, "available_memory", lambda: expected - 1)
    with pytest.raises(InputError, match=rf"needs about {expected / 2**30:.1f} GiB"):
        runner._check_fit(tmp_path, None, config, settings, tokens=1)
    monkeypatch.setattr(loop, "available_memory", lambda: expected)
    runner._check_fit(tmp_path, None, config, settings, tokens=1)


# --- spectrum plan -----------------------------------------------------------------------------------


def plan_command(*argv: str) -> str:
    from spectrum_cli import plan_command

    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    return plan_command.run(parser.parse_args(list(argv)))


def test_spectrum_plan_prints_the_selection_beside_full_fine_tuning_and_the_cheapest_fit(tmp_path):
    llama().save_pretrained(tmp_path / "model")
    selection = tmp_path / "selection.yaml"
    selection.write_text("unfrozen_parameters:\n- ^model\\.layers\\.3\\.\n")
    text = plan_command(str(tmp_path / "model"), "--selection", str(selection), "--gpus", "2", "--gpu-memory", "1GiB", "--seq-len", "64")
    assert "per GPU, 2 GPU(s) of 1GiB, ZeRO-2" in text
    for component in ("weights", "gradients", "optimizer", "activations", "buffers"):
        assert component in text
    assert f"selection {selection}" in text and "full fine-tuning" in text
    assert text.count("cheapest that fits 1GiB") == 2
    lora = plan_command(str(tmp_path / "model" / "config.json"), "--lora-rank", "8", "--seq-len", "64")
    assert "LoRA rank 8" in lora


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--full", "--gpu-memory", "80 parsecs"), "--gpu-memory '80 parsecs' is not a size"),
        (("--full", "--gpus", "0"), "--gpus must be at least 1"),
        (("--full", "--zero-stage", "4"), "unknown --zero-stage 4"),
        (("--selection", "NOTHING"), "selection .*none.yaml does not exist"),
        ((), "name what to train"),
    ],
)
def test_spectrum_plan_refuses_bad_input_with_one_error(tmp_path, argv, message):
    llama().save_pretrained(tmp_path / "model")
    with pytest.raises(InputError, match=message):
        plan_command(str(tmp_path / "model"), *[a.replace("NOTHING", str(tmp_path / "none.yaml")) for a in argv])


def test_spectrum_plan_refuses_a_selection_that_matches_nothing_and_a_folder_without_config(tmp_path):
    llama().save_pretrained(tmp_path / "model")
    selection = tmp_path / "other.yaml"
    selection.write_text("unfrozen_parameters:\n- ^vision_tower\\.\n")
    with pytest.raises(InputError, match="nothing would be trained"):
        plan_command(str(tmp_path / "model"), "--selection", str(selection))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        plan_command(str(tmp_path / "empty"), "--full")


# --- planned against measured --------------------------------------------------------------------------
