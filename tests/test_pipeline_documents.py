"""Bounded YAML: alias bombs, self-reference, deep nesting and huge inputs are clear errors, and messages print bounded values."""

from __future__ import annotations

import resource

import pytest

from flows.pipeline_config import load_pipeline_config, parse_pipeline_config
from stages.base.documents import MAX_SHOWN, load_yaml, load_yaml_file, shown
from stages.base.errors import InputError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The 'billion laughs' of YAML, as one flow list: each level repeats the one before `width` times (width**levels values)."""
    items = [f"&l0 [{', '.join(['lol'] * width)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(items)}]"


def test_an_alias_bomb_is_refused_before_it_is_expanded():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"cfg.yaml expands to more than 1000000 values \(YAML aliases"):
        load_yaml(f"a: {alias_bomb()}", "cfg.yaml")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was expanded


def test_aliases_within_the_bound_load_as_usual():
    assert load_yaml("base: &b {lr: 1}\ncpt: *b\nsft: {<<: *b, steps: 2}\n", "cfg.yaml") == {
        "base": {"lr": 1},
        "cpt": {"lr": 1},
        "sft": {"lr": 1, "steps": 2},
    }
    assert load_yaml("", "cfg.yaml") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [1, *a]\n", r"cfg.yaml: a YAML alias refers to a value that contains it \(line 1\)"),
        ("a: &a {b: *a}\n", r"a value that contains it"),
        ("[" * 100_000, r"cfg.yaml(: nested more than 200 levels deep| is not valid YAML: exceeded maximum nesting depth)"),
        ("a:\n" + "- " * 5000 + "x\n", r"nested more than 200 levels deep \(line 2\)"),
        ("a: [unclosed\n", r"cfg.yaml is not valid YAML: did not find expected ',' or '\]' at line 2, column 1"),
        ("a: !!python/object/apply:os.system [echo]\n", r"could not determine a constructor"),
        ("a: *nowhere\n", r"found undefined alias at line 1, column 4"),
    ],
)
def test_hostile_yaml_is_one_clear_line(text, message):
    with pytest.raises(InputError, match=message) as caught:
        load_yaml(text, "cfg.yaml")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_documents_past_the_size_bound_are_refused_unread(tmp_path):
    with pytest.raises(InputError, match=r"cfg.yaml is more than 100 bytes"):
        load_yaml("a: " + "x" * 200, "cfg.yaml", max_bytes=100)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: " + b"x" * 200)
    with pytest.raises(InputError, match=r"big.yaml is more than 100 bytes"):
        load_yaml_file(big, max_bytes=100)
    with pytest.raises(InputError, match=r"is a folder"):
        load_yaml_file(tmp_path)
    (tmp_path / "latin.yaml").write_bytes(b"a: caf\xe9\n")
    with pytest.raises(InputError, match=r"latin.yaml is not UTF-8 text \(byte 6\)"):
        load_yaml_file(tmp_path / "latin.yaml")


def test_shown_bounds_any_value():
    for value in (list(range(10**6)), "x" * 10**6, {str(i): [[[[i]]]] for i in range(10**5)}):
        assert len(shown(value)) <= MAX_SHOWN
    assert shown("short") == "'short'"


def test_a_pipeline_config_alias_bomb_is_a_clear_error(tmp_path):
    """The reported case: a 483-byte config grew the process to 19 GB (the value expanded into the error text); now refused at once.

    Six levels (531441 values) keep the old failure to a few megabytes of message; nine took 19 GB.
    """
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"model: m\ndata: d\nstages: {{cpt: {{max_steps: {alias_bomb(levels=6)}}}}}\n")
    assert len(config.read_bytes()) < 483
    with pytest.raises(InputError, match=r"pipeline.yaml expands to more than \d+ values") as caught:
        load_pipeline_config(config)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"model": "m", "data": "d", "stages": {"cpt": {"max_steps": ["x" * 1000] * 1000}}}, "stages.cpt.max_steps"),
        ({"model": "m", "data": "d", "stages": {"cpt": [list(range(10**5))]}}, "stages.cpt"),
        ({"model": "m", "data": "d", "revision": {"k": "v" * 10**5}}, "revision"),
        ({"model": "m", "data": "d", "report": "y" * 10**5}, "report"),
        ({"model": "m", "data": "d", "execution": ["x"] * 10**5}, "execution"),
        ({"model": "m", "data": "d", "execution": {"cpt": "z" * 10**5}}, "execution.cpt"),
        ({"model": "m", "data": "d", "k" * 10**5: 1}, "not a pipeline setting"),
        ({"model": "m", "data": "d", "stages": {"s" * 10**5: {}}}, "not a stage"),
        ({"model": "m", "data": "d", "stages": {"cpt": {"o" * 10**5: 1}}}, "not an option of cpt"),
    ],
)
def test_config_errors_print_bounded_values(tmp_path, document, field):
    with pytest.raises(InputError, match=field) as caught:
        parse_pipeline_config(document, tmp_path / "pipeline.yaml")
    assert len(str(caught.value)) < 1000, str(caught.value)[:300]
