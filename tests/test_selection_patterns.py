"""Selection inputs from users: regexes bounded against catastrophic backtracking, malformed files and empty selections named."""

from __future__ import annotations

import json

import pytest
import torch

from stages.base.errors import InputError
from stages.base.patterns import compile_pattern
from stages.core.stage import StageContext
from stages.layer_select import SelectConfig
from stages.layer_select import run as run_select
from stages.training.freezing import apply_selection
from stages.training.selection import Selection, load_selection

PATHOLOGICAL = [
    r"^(a+)+$",  # the classic nested quantifier
    r"^([a-z_.0-9]+)+X$",  # the same against real tensor names: 2**len(name) ways to fail
    r"(a|aa)+$",  # a repeated alternation: Fibonacci-many ways to fail
    r"(?:x*)*y",
    r"(a?){30}a{30}",  # a repeated optional part
    r"(?>(a+)+b)",  # an atomic group still backtracks while it looks for its first match
    r".*a.*b.*c.*d.*e",  # five chained unbounded repetitions: len(name) ** 5
]
ORDINARY = [
    "model.layers.1.mlp.up_proj",  # the reference tool's module lines
    "^lm_head.weight$",
    r"model\.norm",
    r"^model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r".*(gate|up)_proj.*",
    r"^model\.layers\.(1[0-9]|2[0-3])\.",
    r"(\d+\.)?x",
]


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_patterns_that_can_backtrack_without_bound_are_refused_naming_them(pattern):
    with pytest.raises(InputError, match=r"--always-train '.*' (repeats|has \d+ unbounded)"):
        compile_pattern(pattern, "--always-train")


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_tensor_name_patterns_are_accepted(pattern):
    assert compile_pattern(pattern, "line").pattern == pattern


def test_an_overlong_or_invalid_pattern_is_refused():
    with pytest.raises(InputError, match=r"is 2000 characters long"):
        compile_pattern("a" * 2000, "line")
    with pytest.raises(InputError, match=r"line '\[' is not a valid regular expression"):
        compile_pattern("[", "line")


def test_a_yaml_line_with_catastrophic_backtracking_is_refused_before_any_name_is_matched(tmp_path):
    path = tmp_path / "unfrozen_parameters.yaml"
    path.write_text("unfrozen_parameters:\n- model.layers.0.mlp.up_proj\n- ^([a-z_.0-9]+)+X$\n")
    with pytest.raises(InputError, match=r"unfrozen_parameters.yaml: unfrozen_parameters item 2 '\^\(\[a-z_\.0-9\]\+\)\+X\$' repeats"):
        load_selection(str(path), None, None)  # before: accepted, and freezing a model hung in re.match


def test_exact_names_stay_exact_names(tmp_path):
    """A selection.json's names are escaped, never read as regexes (nor refused as pathological ones)."""
    path = tmp_path / "selection.json"
    odd = "model.layers.0.(a+)+.weight"
    path.write_text(json.dumps({"trainable_tensors": [odd], "parameters": [odd]}))
    selection = load_selection(str(path), None, None)
    assert selection.matches(odd) and not selection.matches("model.layers.0.aaa.weight")


@pytest.mark.parametrize(
    ("option", "value"),
    [("always_train", [r"^(a+)+$"]), ("include_types", [r"(mlp|attn)+"]), ("exclude_types", [r"(?:x*)*"])],
)
def test_layer_select_refuses_pathological_option_regexes_before_any_work(tiny_snr_table, tmp_path, option, value):
    flag = "--" + option.replace("_", "-").replace("types", "type")
    with pytest.raises(InputError, match=rf"{flag} '.*' repeats"):
        run_select(SelectConfig(snr_input=str(tiny_snr_table), out_dir=str(tmp_path / "sel"), **{option: value}), StageContext())
    assert not (tmp_path / "sel").exists()


# --- malformed selection files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("s.json", b'{"trainable_tensors": ["a",\n', r"s\.json is not valid JSON: .* at line 2, column 1"),
        ("s.json", b'["lm_head.weight"]', r"s\.json holds a list, not a selection\.json object"),
        ("s.json", b'{"trainable_tensors": "lm_head.weight"}', r"s\.json: 'trainable_tensors' is text, not a list"),
        ("s.json", b'{"trainable_tensors": ["a", 7]}', r"s\.json: 'trainable_tensors' item 2 is a number \(7\), not a tensor name"),
        ("s.json", b'{"trainable_tensors": ["a"], "parameters": {"a": 1}}', r"s\.json: 'parameters' is an object, not a list"),
        ("s.json", b'{"model_id": "x"}', r"s\.json is not a selection\.json from `spectrum select`: it has no 'trainable_tensors' list"),
        ("s.json", b'{"trainable_tensors": ["caf\xe9"]}', r"s\.json is not UTF-8 text \(byte 27\)"),
        ("s.json", b"[" * 100_000, r"s\.json is nested too deeply"),
        ("s.yaml", b"- a\n- b\n", r"s\.yaml has no `unfrozen_parameters` list \(the Axolotl layout\); it has a list"),
        ("s.yaml", b"unfrozen_parameters: x\n", r"s\.yaml has no `unfrozen_parameters` list .* it has keys \['unfrozen_parameters'\]"),
        ("s.yaml", b"unfrozen_parameters:\n- a\n- 12\n", r"s\.yaml: unfrozen_parameters item 2 is 12 \(a number\), not a pattern"),
        ("s.yaml", b"unfrozen_parameters:\n- \xff\n", r"s\.yaml is not UTF-8 text"),
        ("s.yaml", b"unfrozen_parameters: [a\n", r"s\.yaml is not valid YAML"),
    ],
)
def test_malformed_selection_files_are_one_line_errors(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match=message):
        load_selection(str(path), None, None)


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(9)
    ]
    lines.append("unfrozen_parameters: *j")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"bomb\.yaml expands to more than \d+ values"):
        load_selection(str(path), None, None)


def test_an_oversized_selection_file_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from stages.training import selection

    monkeypatch.setattr(selection, "MAX_SELECTION_BYTES", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"trainable_tensors": ["x" * 200]}))
    with pytest.raises(InputError, match=r"big\.json is more than 0 MiB"):
        load_selection(str(path), None, None)


# --- a selection that trains nothing names its culprit ----------------------------------------------


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_an_empty_selection_says_which_patterns_matched_nothing_and_what_the_names_look_like(llama):
    selection = Selection(("transformer.h.0.attn", r"^gpt_neox\."), "other.yaml", {})
    with pytest.raises(InputError) as caught:
        apply_selection(llama, selection)
    message = str(caught.value)
    assert "matching nothing: 'transformer.h.0.attn', '^gpt_neox\\\\.'" in message
    assert "this model's 21 parameters are named like 'model.embed_tokens.weight'" in message and "'lm_head.weight'" in message
    assert "re.match" in message


def test_a_selection_json_with_no_tensors_says_so(tmp_path, llama):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"trainable_tensors": []}))
    with pytest.raises(InputError, match=r"selection\.json lists no tensor to train"):
        apply_selection(llama, load_selection(str(path), None, None))


def test_names_the_model_lacks_are_listed_with_the_names_it_has(tmp_path, llama):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"trainable_tensors": ["transformer.h.0.attn.c_attn.weight"]}))
    missing = r"names 1 tensor\(s\) this model does not have \('transformer.h.0.attn.c_attn.weight'\)"
    with pytest.raises(InputError, match=missing + r"; .*named like 'model.embed_tokens.weight'"):
        apply_selection(llama, load_selection(str(path), None, None))


def test_indexed_module_lines_match_exactly_as_re_match_does():
    """Plain lines are looked up, not scanned, yet mean what Axolotl's re.match makes of them (every `.` matches anything)."""
    import re

    lines = ("model.layers.1.mlp", "model.layers.1.self_attn.q_proj", "lm_head", "model.norm", r"^model\.layers\.0\.", "a-b_c")
    names = [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",  # `1.` of the line: `.` meets `0`, then `mlp` meets `.mlp`: no match
        "model.layers.1Xmlp.weight",  # `.` matches `X`
        "model.layers.1.self_attn.q_proj.bias",
        "model.layers.1.self_attn.q_projection.weight",  # a prefix: re.match matches it too
        "model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
        "model_norm.weight",
        "model.embed_tokens.weight",
        "a-b_c",
    ]
    selection = Selection(lines, "s.yaml", {})
    for name in names:
        assert selection.matches(name) == any(re.match(line, name) for line in lines), name
        assert sorted(selection.matching_patterns(name)) == sorted(line for line in lines if re.match(line, name)), name
    assert selection.unmatched(names) == ()
    assert selection.unmatched(names[:2]) == ("model.layers.1.self_attn.q_proj", "lm_head", "model.norm", r"^model\.layers\.0\.", "a-b_c")


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_the_scan_refuses_pathological_type_regexes_before_any_work(tiny_model, tmp_path, option):
    from stages.snr_scan import ScanConfig
    from stages.snr_scan import run as run_scan

    config = ScanConfig(model_dir=str(tiny_model), output=str(tmp_path / "snr.parquet"), **{option: ["^(a+)+$"]})
    with pytest.raises(InputError, match=rf"--{option} '\^\(a\+\)\+\$' .*catastrophic backtracking"):
        run_scan(config, StageContext(progress=False))
    assert not (tmp_path / "snr.parquet").exists()
