"""The files layer_select reads and writes: a binary reference JSON is refused, the YAML reads back as the selection."""

from __future__ import annotations

import json

import yaml

from stages import layer_select
from stages.core.stage import StageContext

from .helpers import cli


def test_a_binary_file_given_as_reference_json_is_a_clear_error(tmp_path, capsys):
    binary = tmp_path / "snr_results_m.json"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = cli(capsys, "select", str(binary), "-o", str(tmp_path / "sel"))
    assert code == 2 and "is not a JSON text file" in err and len(err.strip().splitlines()) == 1


# --- 12. the YAML reads back as the selection ----------------------------------------------------------


def test_tensor_names_with_yaml_syntax_are_quoted_and_read_back_exactly(tmp_path):
    names = [
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp: up_proj",
        "model.layers.2.mlp #up_proj",
        "model.layers.3.mlp\nup_proj",
        "model.layers.4.mlp.'up'",
        "model.layers.5.null",
    ]
    flat = {name: {"snr": 1.0 + index, "type": "mlp"} for index, name in enumerate(names)}
    source = tmp_path / "snr_results_m.json"
    source.write_text(json.dumps(flat))
    result = layer_select.run(
        layer_select.SelectConfig(snr_input=str(source), out_dir=str(tmp_path / "sel"), top_percent=100, always_train=[]),
        StageContext(),
    ).detail
    loaded = yaml.safe_load((tmp_path / "sel" / "unfrozen_parameters.yaml").read_text())["unfrozen_parameters"]
    assert sorted(loaded) == sorted(names)
    assert sorted(loaded) == sorted(result.summary["unfrozen_parameters"])
