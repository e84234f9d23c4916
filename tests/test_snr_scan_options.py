"""The snr_scan stage's options and refusals: checked before any work, non-finite weights named, existing outputs kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stages.base.errors import CorruptWeightsError, InputError, OutputExistsError
from stages.scan.table import read_table_metadata

from .helpers import (
    LLAMA_TYPES,
    by_name,
    cli,
    no_decomposition,
    partial_journal,
    rows_of,
    scan,
    without,
)


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_must_be_positive(tiny_model, tmp_path, workers):
    with pytest.raises(InputError, match="--workers must be at least 1"):
        scan(tiny_model, tmp_path / "snr.parquet", workers=workers)
    assert not (tmp_path / "snr.parquet").exists()


def test_an_error_in_one_worker_stops_the_parallel_scan(tmp_path, write_checkpoint):
    g = torch.Generator().manual_seed(4)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 24, generator=g) for i in range(8)}
    tensors["model.layers.5.mlp.up_proj.weight"][0, 0] = float("nan")
    folder = write_checkpoint(tmp_path / "m", tensors)
    out = tmp_path / "snr.parquet"
    with pytest.raises(CorruptWeightsError, match="model.layers.5.mlp.up_proj.weight"):
        scan(folder, out, workers=4)
    assert not out.exists()
    partial_rows = [json.loads(line)["tensor_name"] for line in partial_journal(out).read_text().splitlines()[1:]]
    assert partial_rows == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(len(partial_rows))]
    assert len(partial_rows) <= 5


# --- include / exclude ----------------------------------------------------------------------------


def test_include_scans_only_matching_types(tiny_model, tmp_path):
    rows = scan(tiny_model, tmp_path / "snr.parquet", include=["^mlp\\."]).rows
    scanned = {r["module_type"] for r in rows if r["scanned"]}
    assert scanned == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    q = by_name(rows)["model.layers.0.self_attn.q_proj.weight"]
    assert q["scanned"] is False and q["skip_reason"] == "type 'self_attn.q_proj' not selected by --include"
    assert json.loads(read_table_metadata(pq.read_table(tmp_path / "snr.parquet"))["include"]) == ["^mlp\\."]


def test_exclude_skips_matching_types(tiny_model, tmp_path):
    rows = scan(tiny_model, tmp_path / "snr.parquet", exclude=["self_attn\\.[qk]_proj", "lm_head"]).rows
    scanned = {r["module_type"] for r in rows if r["scanned"]}
    assert scanned == (LLAMA_TYPES - {"self_attn.q_proj", "self_attn.k_proj"}) | {"model.embed_tokens"}
    head = by_name(rows)["lm_head.weight"]
    assert head["scanned"] is False and "excluded by --exclude 'lm_head'" in head["skip_reason"]


def test_include_and_exclude_combine(tiny_model, tmp_path):
    rows = scan(tiny_model, tmp_path / "snr.parquet", include=["self_attn"], exclude=["o_proj"]).rows
    assert {r["module_type"] for r in rows if r["scanned"]} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_invalid_regex_is_rejected_before_any_work(tiny_model, tmp_path, option):
    out = tmp_path / "snr.parquet"
    with pytest.raises(InputError) as raised:
        scan(tiny_model, out, **{option: ["mlp[("]})
    assert f"--{option} 'mlp[('" in str(raised.value) and "regular expression" in str(raised.value)
    assert not out.exists() and not Path(f"{out}.partial.jsonl").exists()


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_pattern_matching_no_type_is_an_error(tiny_model, tmp_path, option):
    out = tmp_path / "snr.parquet"
    with pytest.raises(InputError) as raised:
        scan(tiny_model, out, **{option: ["experts"]})
    message = str(raised.value)
    assert f"--{option} 'experts' matches no matrix type" in message
    assert "self_attn.q_proj" in message  # the error lists the model's types
    assert not out.exists()


def test_excluding_everything_is_an_error(tiny_model, tmp_path):
    out = tmp_path / "snr.parquet"
    with pytest.raises(InputError, match="nothing to scan"):
        scan(tiny_model, out, exclude=["."])
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [("estimator", "magic"), ("svd_method", "lanczos")])
def test_unknown_estimator_or_method(tiny_model, tmp_path, option, value):
    with pytest.raises(InputError, match=value):
        scan(tiny_model, tmp_path / "snr.parquet", **{option: value})
    assert not (tmp_path / "snr.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu(tiny_model, tmp_path):
    with pytest.raises(InputError, match="no CUDA GPU"):
        scan(tiny_model, tmp_path / "snr.parquet", device="cuda")
    assert not (tmp_path / "snr.parquet").exists()


# --- refusals and non-finite weights ------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "label"), [(float("nan"), "1 NaN and 0 Inf"), (float("inf"), "0 NaN and 1 Inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_weight_names_the_tensor(tmp_path, write_checkpoint, bad, label, dtype):
    g = torch.Generator().manual_seed(3)
    broken = torch.randn(20, 12, generator=g)
    broken[3, 5] = bad
    folder = write_checkpoint(
        tmp_path / "m",
        {
            "model.layers.0.mlp.up_proj.weight": torch.randn(20, 12, generator=g).to(dtype),
            "model.layers.1.mlp.up_proj.weight": broken.to(dtype),
            "model.layers.2.mlp.up_proj.weight": torch.randn(20, 12, generator=g).to(dtype),
        },
    )
    out = tmp_path / "out" / "snr.parquet"
    with pytest.raises(CorruptWeightsError) as raised:
        scan(folder, out, reference_json=str(tmp_path / "out" / "ref.json"))
    message = str(raised.value)
    assert "'model.layers.1.mlp.up_proj.weight'" in message
    assert label in message and "[3, 5]" in message
    assert not out.exists() and not (tmp_path / "out" / "ref.json").exists()


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_non_finite_weight_is_caught_by_both_methods(tmp_path, write_checkpoint, method):
    broken = torch.randn(16, 40)
    broken[7, 2] = float("nan")
    folder = write_checkpoint(tmp_path / "m", {"model.layers.0.mlp.down_proj.weight": broken})
    with pytest.raises(CorruptWeightsError, match=r"'model.layers.0.mlp.down_proj.weight'.*1 NaN and 0 Inf.*\[7, 2\]"):
        scan(folder, tmp_path / "snr.parquet", svd_method=method)


def test_float64_weights_too_large_to_square_point_to_the_svd_method(tmp_path, write_checkpoint):
    huge = torch.randn(16, 40, dtype=torch.float64) * 1e200  # finite, but its Gram overflows float64
    folder = write_checkpoint(tmp_path / "m", {"model.layers.0.mlp.down_proj.weight": huge})
    with pytest.raises(CorruptWeightsError, match=r"too large in magnitude for the Gram route.*--svd-method svd"):
        scan(folder, tmp_path / "gram.parquet")
    result = scan(folder, tmp_path / "svd.parquet", svd_method="svd")
    assert result.scanned == 1 and math.isfinite(result.rows[0]["snr"])


def test_existing_output_is_refused_and_kept(tiny_model, tmp_path):
    out = tmp_path / "snr.parquet"
    out.write_bytes(b"precious earlier result")
    with pytest.raises(OutputExistsError) as raised:
        scan(tiny_model, out)
    assert str(out) in str(raised.value) and "--overwrite" in str(raised.value)
    assert out.read_bytes() == b"precious earlier result"
    assert raised.value.exit_code == 4


def test_existing_reference_json_is_refused_before_writing_the_table(tiny_model, tmp_path):
    out = tmp_path / "snr.parquet"
    ref = tmp_path / "ref.json"
    ref.write_text("{}")
    with pytest.raises(OutputExistsError, match="ref.json"):
        scan(tiny_model, out, reference_json=str(ref))
    assert not out.exists() and ref.read_text() == "{}"


def test_overwrite_replaces_the_output(tiny_model, tiny_snr_table, tmp_path):
    out = tmp_path / "snr.parquet"
    out.write_bytes(b"old")
    scan(tiny_model, out, overwrite=True, model_id="tiny-llama")
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_decomposition_that_does_not_converge_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    from stages.base.errors import SpectrumError
    from stages.scan import spectra

    def failing(*args, **kwargs):
        raise spectra.DecompositionError("Eigenvalues did not converge")

    monkeypatch.setattr(spectra, "gram_singular_values", failing)  # the eigen step of every matrix, streamed or not
    with pytest.raises(SpectrumError, match=r"did not converge with --svd-method gram.*retry with the other --svd-method"):
        scan(tiny_model, tmp_path / "snr.parquet")
    assert not (tmp_path / "snr.parquet").exists()


# --- 6. filesystem errors: checked before the work, one line each ---------------------------------


def test_output_clashes_and_folders_are_refused_before_the_scan(tiny_model, tmp_path, capsys, monkeypatch):
    no_decomposition(monkeypatch)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    same = tmp_path / "snr.parquet"
    cases = [
        (["--out", str(folder)], "is a folder"),
        (["--out", str(a_file / "snr.parquet")], "is a file, not a folder"),
        (["--out", str(same), "--reference-json", str(same), "--overwrite"], "--out and --reference-json both name"),
        (["--out", str(same), "--device", "gpu"], "unknown --device 'gpu'"),
    ]
    for options, message in cases:
        code, _, err = cli(capsys, "scan", str(tiny_model), "--no-progress", *options)
        assert code == 2, (options, err)
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not same.exists()
