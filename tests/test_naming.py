"""Module names, module types and layer indices follow the reference tool's rules."""

from __future__ import annotations

import random

import pytest

from stages.weights.naming import layer_index, module_name, module_type, natural_key


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj", "self_attn.q_proj"),
        ("model.layers.0.mlp.down_proj", "mlp.down_proj"),
        ("model.layers.3.input_layernorm", "input_layernorm"),
        ("lm_head", "lm_head"),
        ("model.embed_tokens", "model.embed_tokens"),
        ("model.norm", "model.norm"),
        # only the FIRST all-digit component counts: MoE experts keep their expert index
        ("model.layers.1.block_sparse_moe.experts.7.w1", "block_sparse_moe.experts.7.w1"),
        ("encoder.layer.5.attention.self.query", "attention.self.query"),
        # a component that merely contains digits is not a layer index
        ("transformer.h2.attn", "transformer.h2.attn"),
        ("model.layers.-1.mlp", "model.layers.-1.mlp"),
    ],
)
def test_module_type(name, expected):
    assert module_type(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj", 12),
        ("model.layers.0.mlp.up_proj", 0),
        ("model.layers.1.block_sparse_moe.experts.7.w1", 1),
        ("lm_head", None),
        ("model.embed_tokens", None),
        ("model.norm", None),
        ("transformer.h2.attn", None),
    ],
)
def test_layer_index(name, expected):
    assert layer_index(name) == expected


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj"),
        ("lm_head.weight", "lm_head"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
        # only `.weight` is stripped: biases and buffers keep their full name
        ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.bias"),
        ("embeddings.position_ids", "embeddings.position_ids"),
        ("weight", "weight"),
        ("model.weights", "model.weights"),
    ],
)
def test_module_name(tensor, expected):
    assert module_name(tensor) == expected


def test_type_of_a_module_name_from_a_tensor_name():
    assert module_type(module_name("model.layers.31.self_attn.o_proj.weight")) == "self_attn.o_proj"
    assert module_type(module_name("lm_head.weight")) == "lm_head"


def test_natural_order_puts_layer_2_before_layer_10():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (10, 2, 1, 0, 21, 3)] + ["lm_head.weight", "model.embed_tokens.weight"]
    ordered = sorted(names, key=natural_key)
    assert ordered == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.21.mlp.up_proj.weight",
    ]


def test_natural_order_is_total_and_stable_under_shuffling():
    names = [f"model.layers.{i}.{m}.weight" for i in range(12) for m in ("mlp.up_proj", "self_attn.q_proj", "input_layernorm")]
    names += ["model.norm.weight", "model.layers.2", "model.layers.x.weight"]  # digits and words at the same depth
    expected = sorted(names, key=natural_key)
    for seed in range(5):
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        assert sorted(shuffled, key=natural_key) == expected
    assert expected.index("model.layers.2") < expected.index("model.layers.2.input_layernorm.weight")
    assert expected.index("model.layers.11.mlp.up_proj.weight") < expected.index("model.layers.x.weight")
