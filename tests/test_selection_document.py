"""The selection document (stages/selection): one schema for selection.json and the Axolotl YAML, and one matcher for its lines."""

from __future__ import annotations

import json
import re

import pytest

from stages.base.errors import InputError
from stages.core.stage import StageContext, options_of
from stages.layer_select import Entry, SelectConfig, SnrSource, _nan_last, select
from stages.layer_select import run as run_select
from stages.selection.document import POLICY_OPTIONS, SelectionDocument, UnfrozenParameters
from stages.selection.matching import PatternSet
from stages.training.selection import load_selection
from stages.weights.roles import RoleMap


@pytest.fixture(scope="module")
def written(tiny_snr_table, tmp_path_factory):
    """selection.json and the YAML layer_select writes for the tiny model (budget policy: nulls in the policy)."""
    out = tmp_path_factory.mktemp("selection")
    config = SelectConfig(snr_input=str(tiny_snr_table), out_dir=str(out), policy="budget", budget_percent=60.0, top_percent=None)
    run_select(config, StageContext(progress=False))
    return out


def test_the_written_json_reads_back_as_a_document_that_writes_the_same_bytes(written):
    data = (written / "selection.json").read_bytes()
    document = SelectionDocument.from_json(data, "selection.json")
    assert document.to_json() == data
    assert document.trainable_tensors and all(isinstance(name, str) for name in document.trainable_tensors)
    assert set(document.trainable_tensors) <= set(document.parameters)


def test_the_policy_is_what_layer_select_selects_with_again(written):
    document = load_selection(str(written / "selection.json"), None, None).document
    assert isinstance(document, SelectionDocument)
    cache_options = tuple(f.name for f, spec in options_of(SelectConfig) if spec.cache)
    assert tuple(document.policy) == POLICY_OPTIONS and set(POLICY_OPTIONS) == set(cache_options)
    assert document.policy["policy"] == "budget" and document.policy["top_percent"] is None  # a recorded null stays null
    again = SelectConfig(snr_run="scan", **document.policy)
    made = SelectConfig(snr_run="scan", policy="budget", budget_percent=60.0, top_percent=None)
    assert again.cache_parameters() == made.cache_parameters()


def test_an_older_document_records_only_the_options_it_had(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"trainable_tensors": ["lm_head.weight"], "policy": "global", "top_percent": 30}))
    document = load_selection(str(path), None, None).document
    assert document.policy == {"policy": "global", "top_percent": 30}  # the rest: SelectConfig's defaults
    assert document.estimator is None and document.parameters is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_percent", "half", r"'top_percent' is 'half' \(text\), not a percentage or null"),
        ("include_types", "mlp", r"'include_types' is 'mlp' \(text\), not a list of patterns"),
        ("depth_aware", 1, r"'depth_aware' is 1 \(a number\), not true or false"),
    ],
)
def test_a_malformed_policy_is_a_one_line_error_when_rescan_reads_it(tmp_path, field, value, message):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"trainable_tensors": ["lm_head.weight"], field: value}))
    selection = load_selection(str(path), None, None)  # cpt does not read the policy: the selection still trains
    assert selection.matches("lm_head.weight")
    with pytest.raises(InputError, match=rf"selection\.json: {message}; make the selection again"):
        selection.document.policy  # noqa: B018


def test_a_yaml_selection_has_no_document_and_its_lines_round_trip(written):
    selection = load_selection(str(written / "unfrozen_parameters.yaml"), None, None)
    assert selection.document is None
    text = (written / "unfrozen_parameters.yaml").read_text()
    lines = UnfrozenParameters.from_yaml(text.encode(), "u.yaml").lines
    assert lines == selection.patterns
    assert UnfrozenParameters(lines).to_yaml() == "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n"


def test_yaml_headings_sit_before_their_lines_and_an_empty_type_keeps_its_heading():
    yaml_text = UnfrozenParameters(("^a$", "b.c", "d"), ((1, "mlp"), (3, "self_attn  x"), (3, "last"))).to_yaml()
    assert yaml_text == "unfrozen_parameters:\n- ^a$\n# mlp layers\n- b.c\n- d\n# self_attn x layers\n# last layers\n"


def test_the_parameters_are_exactly_the_names_the_yaml_lines_match():
    """A plain line's `.` matches any character (re.match, as Axolotl): a line that would also train another tensor is narrowed."""
    entries = [
        Entry("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj", "mlp.up_proj", 2.0, 10, True),
        Entry("model.layers.1.mlp.up_proj.bias", "model.layers.1.mlp.up_proj.bias", "mlp.up_proj", None, 1, False, "1-D"),
        Entry("model.layers.1_mlp.up_proj.weight", "model.layers.1_mlp.up_proj", "other", None, 10, False, "not scanned"),
        Entry("model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.up_proj", "mlp.up_proj", 1.0, 10, True),
    ]
    source = SnrSource(entries, RoleMap({}, "names"), "m", _nan_last)
    result = select(SelectConfig(snr_input="x", top_percent=50.0, always_train=[]), source)
    lines = UnfrozenParameters.from_yaml(result.yaml_text.encode(), "u.yaml").lines
    names = [e.tensor_name for e in entries]
    trained = [name for name in names if any(re.match(line, name) for line in lines)]
    assert list(result.document.parameters) == trained == ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.bias"]
    assert lines == (r"^model\.layers\.1\.mlp\.up_proj\.",)


def test_the_matcher_agrees_with_re_match_on_every_kind_of_line():
    lines = ("model.layers.1.mlp", r"^model\.layers\.0\.mlp\.gate\.", r"^lm_head\.weight$", "^lm_head.weight$", "lm_head", r"^lm_head")
    lines += (r".*norm",)
    names = ["model.layers.1.mlp.up.weight", "model.layers.1Xmlp", "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight"]
    names += ["lm_head.weight", "lm_headXweight", "model.norm.weight", "lm_hea"]
    matcher = PatternSet(lines, "test", exact_names=["lm_head.weight"])
    for name in names:
        assert sorted(matcher.matching(name)) == sorted(line for line in lines if re.match(line, name)), name


def test_a_selected_module_trains_its_weight_and_bias_by_one_rule():
    from stages.weights.naming import module_bias

    assert module_bias("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.bias"
    assert module_bias("model.layers.0.mlp.experts.gate_up_proj") is None and module_bias("model.norm.bias") is None
