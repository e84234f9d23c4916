"""The snr_scan stage: the table it writes, its options, its refusals, and resuming a killed scan."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stages.base.errors import CorruptWeightsError, InputError, OutputExistsError
from stages.core.stage import StageContext
from stages.scan.estimators import reference_snr
from stages.scan.spectra import singular_values
from stages.scan.table import SNR_SCHEMA, load_reference_json, read_table_metadata
from stages.snr_scan import ScanConfig, run
from stages.weights.checkpoint import INDEX_FILE

from .helpers import REPO_ROOT, interrupt_scan_after

STAT_COLUMNS = (
    "tensor_sha256",
    "estimator",
    "svd_method",
    "device",
    "sigma",
    "threshold",
    "signal_count",
    "singular_value_count",
    "max_singular_value",
    "signal_sum",
    "noise_sum",
    "snr",
    "scan_seconds",
)
LLAMA_TYPES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def scan(model: Path, out: Path, progress: bool = False, **options):
    return run(ScanConfig(model_dir=str(model), output=str(out), **options), StageContext(progress=progress)).detail


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def without(rows: list[dict], *columns: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["tensor_name"]: r for r in rows}


def _raw_tensor_bytes(shard: Path) -> dict[str, bytes]:
    """Each tensor's bytes as stored, located through the safetensors header (independent of safetensors)."""
    data = shard.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    return {
        name: data[base + meta["data_offsets"][0] : base + meta["data_offsets"][1]]
        for name, meta in header.items()
        if name != "__metadata__"
    }


# --- the table -----------------------------------------------------------------------------------


def test_table_has_one_row_per_tensor_with_the_schema(tiny_model, tiny_snr_table):
    table = pq.read_table(tiny_snr_table)
    assert table.schema.remove_metadata() == SNR_SCHEMA
    rows = table.to_pylist()
    # 2 layers x (7 matrices + 2 norms) + embed_tokens + lm_head + final norm
    assert len(rows) == 2 * 9 + 3
    scanned = [r for r in rows if r["scanned"]]
    assert len(scanned) == 2 * 7 + 2
    assert {r["module_type"] for r in scanned} == LLAMA_TYPES | {"model.embed_tokens", "lm_head"}
    for r in rows:
        assert r["model_id"] == "tiny-llama"
        assert r["dtype"] == "BF16"
        assert r["shard"] == "model.safetensors"
        assert r["parameter_count"] == math.prod(r["shape"])
        assert r["code_version"]
    q = by_name(rows)["model.layers.1.self_attn.q_proj.weight"]
    assert (q["module_name"], q["module_type"], q["layer_index"]) == ("model.layers.1.self_attn.q_proj", "self_attn.q_proj", 1)
    assert (q["rows"], q["cols"], q["shape"]) == (64, 64, [64, 64])
    k = by_name(rows)["model.layers.0.self_attn.k_proj.weight"]
    assert k["shape"] == [32, 64] and k["singular_value_count"] == 32
    head = by_name(rows)["lm_head.weight"]
    assert head["layer_index"] is None and head["module_type"] == "lm_head" and head["shape"] == [512, 64]


def test_scanned_rows_hold_consistent_statistics(tiny_model, tiny_snr_table):
    from stages.weights.checkpoint import ModelWeights

    weights = ModelWeights.open(tiny_model)
    infos = {t.name: t for t in weights.tensors}
    for r in rows_of(tiny_snr_table):
        if not r["scanned"]:
            continue
        assert r["skip_reason"] is None
        assert (r["estimator"], r["svd_method"], r["device"]) == ("reference", "gram", "cpu")
        assert r["scan_seconds"] >= 0
        # the row's numbers are the reference formula on this tensor's singular values
        s = singular_values(weights.read(infos[r["tensor_name"]]))
        expected = reference_snr(s, r["rows"], r["cols"])
        assert r["snr"] == pytest.approx(expected.snr, rel=1e-12)
        assert r["max_singular_value"] == pytest.approx(s[0], rel=1e-12)
        assert r["signal_count"] == int((s > r["threshold"]).sum())
        assert r["signal_sum"] == pytest.approx(float(s[s > r["threshold"]].sum()), rel=1e-12)
        assert r["signal_sum"] / r["noise_sum"] / r["max_singular_value"] == pytest.approx(r["snr"], rel=1e-12)


def test_one_dimensional_tensors_are_recorded_not_scanned(tiny_snr_table):
    rows = rows_of(tiny_snr_table)
    norms = [r for r in rows if len(r["shape"]) == 1]
    assert {r["tensor_name"] for r in norms} == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    }
    for r in norms:
        assert r["scanned"] is False
        assert "1-D tensor" in r["skip_reason"] and "not a matrix" in r["skip_reason"]
        assert r["rows"] is None and r["cols"] is None
        assert r["parameter_count"] == 64
        for column in STAT_COLUMNS:
            assert r[column] is None, column  # no fake numbers for tensors that were not scanned


def test_table_metadata_records_the_run(tiny_model, tiny_snr_table):
    table = pq.read_table(tiny_snr_table)
    meta = read_table_metadata(table)
    assert meta["stage"] == "snr_scan"
    assert meta["model_id"] == "tiny-llama"
    assert meta["estimator"] == "reference" and meta["svd_method"] == "gram"
    assert meta["roles_source"] == "model-config"
    assert json.loads(meta["include"]) == [] and json.loads(meta["exclude"]) == []
    assert int(meta["model_parameter_count"]) == sum(table.column("parameter_count").to_pylist())
    assert Path(meta["model_dir"]) == tiny_model.resolve()
    assert len(meta["model_fingerprint"]) == 64


def test_default_model_id_is_the_folder_name(synthetic_model, tmp_path):
    model = tmp_path / "My-Model-7B"
    shutil.copytree(synthetic_model(), model)
    result = scan(model, tmp_path / "snr.parquet")
    assert {r["model_id"] for r in rows_of(result.output)} == {"My-Model-7B"}


def test_tensor_sha256_is_the_hash_of_the_stored_bytes(tiny_model, tiny_snr_table):
    raw = _raw_tensor_bytes(tiny_model / "model.safetensors")
    scanned = [r for r in rows_of(tiny_snr_table) if r["scanned"]]
    assert scanned
    for r in scanned:
        assert r["tensor_sha256"] == hashlib.sha256(raw[r["tensor_name"]]).hexdigest()


def test_table_is_readable_by_pandas_and_duckdb(tiny_snr_table):
    import duckdb
    import pandas as pd

    frame = pd.read_parquet(tiny_snr_table)
    assert len(frame) == 21 and frame["scanned"].sum() == 16
    assert frame.loc[~frame["scanned"], "snr"].isna().all()
    assert frame.loc[frame["scanned"], "snr"].notna().all()
    best = frame[frame["scanned"]].sort_values("snr", ascending=False).iloc[0]

    con = duckdb.connect()
    try:
        count, scanned, top = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE scanned), arg_max(tensor_name, snr) FROM read_parquet(?)", [str(tiny_snr_table)]
        ).fetchone()
        per_type = dict(
            con.execute(
                "SELECT module_type, count(*) FROM read_parquet(?) WHERE scanned GROUP BY module_type", [str(tiny_snr_table)]
            ).fetchall()
        )
        shapes = con.execute("SELECT shape FROM read_parquet(?) WHERE tensor_name = 'lm_head.weight'", [str(tiny_snr_table)]).fetchone()
    finally:
        con.close()
    assert (count, scanned, top) == (21, 16, best["tensor_name"])
    assert per_type == {**{t: 2 for t in LLAMA_TYPES}, "model.embed_tokens": 1, "lm_head": 1}
    assert list(shapes[0]) == [512, 64]


def test_reference_json_export_loads_back(tiny_model, tmp_path):
    out = tmp_path / "snr.parquet"
    exported = tmp_path / "snr_results_tiny.json"
    result = scan(tiny_model, out, reference_json=str(exported))
    entries = load_reference_json(exported)
    scanned = [r for r in result.rows if r["scanned"]]
    assert [e.name for e in entries] == [r["module_name"] for r in scanned]
    for entry, row in zip(entries, scanned, strict=False):
        assert entry.snr == row["snr"]
        assert entry.module_type == row["module_type"]
    # the flat layout of the reference tool: {module: {"snr": x, "type": t}}
    raw = json.loads(exported.read_text())
    assert raw["model.layers.0.mlp.up_proj"] == {"snr": by_name(scanned)["model.layers.0.mlp.up_proj.weight"]["snr"], "type": "mlp.up_proj"}
    assert "model.norm" not in raw


def test_progress_bar_is_shown_when_asked(tiny_model, tmp_path, capsys):
    scan(tiny_model, tmp_path / "snr.parquet", progress=True, model_id="bar-test")
    err = capsys.readouterr().err
    assert "SNR scan bar-test" in err and "16/16" in err


# --- checkpoint layouts and dtypes ---------------------------------------------------------------


def test_sharded_and_single_file_give_the_same_table(synthetic_model, tiny_model, tmp_path):
    sharded = synthetic_model(max_shard_bytes=40_000)
    shard_files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert (sharded / INDEX_FILE).is_file() and len(shard_files) > 3
    a = scan(tiny_model, tmp_path / "single.parquet", model_id="m")
    b = scan(sharded, tmp_path / "sharded.parquet", model_id="m")
    rows_a, rows_b = rows_of(a.output), rows_of(b.output)
    assert without(rows_a, "shard", "scan_seconds") == without(rows_b, "shard", "scan_seconds")
    assert {r["shard"] for r in rows_b} == set(shard_files)
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    assert all(index[r["tensor_name"]] == r["shard"] for r in rows_b)


@pytest.mark.parametrize(("dtype", "code"), [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_every_float_dtype_scans(synthetic_model, tmp_path, dtype, code):
    model = synthetic_model(dtype=dtype)
    result = scan(model, tmp_path / "snr.parquet")
    rows = rows_of(result.output)
    assert {r["dtype"] for r in rows} == {code}
    scanned = [r for r in rows if r["scanned"]]
    assert len(scanned) == 16
    assert all(math.isfinite(r["snr"]) and r["snr"] > 0 for r in scanned)
    raw = _raw_tensor_bytes(model / "model.safetensors")
    assert all(r["tensor_sha256"] == hashlib.sha256(raw[r["tensor_name"]]).hexdigest() for r in scanned)


def test_dtypes_agree_on_the_same_weights(synthetic_model, tmp_path):
    """fp32, fp16 and bf16 copies of one model differ only by rounding: the largest singular values agree."""
    values = {}
    for dtype in ("float32", "float16", "bfloat16"):
        rows = scan(synthetic_model(dtype=dtype), tmp_path / f"{dtype}.parquet", model_id="m").rows
        values[dtype] = {r["tensor_name"]: r["max_singular_value"] for r in rows if r["scanned"]}
    for name, exact in values["float32"].items():
        assert values["float16"][name] == pytest.approx(exact, rel=2e-3)
        assert values["bfloat16"][name] == pytest.approx(exact, rel=1e-2)


def test_non_float_and_empty_tensors_are_not_scanned(tmp_path, write_checkpoint):
    g = torch.Generator().manual_seed(1)
    folder = write_checkpoint(
        tmp_path / "m",
        {
            "layers.0.proj.weight": torch.randn(16, 8, generator=g),
            "embeddings.position_ids": torch.arange(32).reshape(1, 32),
            "layers.0.empty.weight": torch.zeros(0, 8),
            "layers.0.conv.weight": torch.randn(4, 3, 2, generator=g),
        },
    )
    rows = by_name(rows_of(scan(folder, tmp_path / "snr.parquet").output))
    assert rows["layers.0.proj.weight"]["scanned"] is True
    assert rows["embeddings.position_ids"]["scanned"] is False and "I64" in rows["embeddings.position_ids"]["skip_reason"]
    assert rows["layers.0.empty.weight"]["scanned"] is False and "empty" in rows["layers.0.empty.weight"]["skip_reason"]
    assert rows["layers.0.conv.weight"]["scanned"] is False and "3-D" in rows["layers.0.conv.weight"]["skip_reason"]
    for name in ("embeddings.position_ids", "layers.0.empty.weight", "layers.0.conv.weight"):
        assert rows[name]["snr"] is None and rows[name]["sigma"] is None


def test_svd_method_matches_gram(tiny_model, tiny_snr_table, tmp_path):
    svd = by_name(rows_of(scan(tiny_model, tmp_path / "svd.parquet", svd_method="svd", model_id="tiny-llama").output))
    for r in rows_of(tiny_snr_table):
        if r["scanned"]:
            assert svd[r["tensor_name"]]["svd_method"] == "svd"
            assert svd[r["tensor_name"]]["snr"] == pytest.approx(r["snr"], rel=1e-10)
            assert svd[r["tensor_name"]]["signal_count"] == r["signal_count"]


def test_gavish_donoho_scan_estimates_the_planted_noise_level(tiny_model, tmp_path):
    rows = scan(tiny_model, tmp_path / "gd.parquet", estimator="gavish-donoho").rows
    scanned = [r for r in rows if r["scanned"]]
    assert {r["estimator"] for r in scanned} == {"gavish-donoho"}
    # SyntheticSpec.noise_std = 0.02; the GD sigma is a per-entry noise estimate
    for r in scanned:
        assert r["sigma"] == pytest.approx(0.02, rel=0.25), r["tensor_name"]
        assert 0 < r["signal_count"] < r["singular_value_count"]
        assert r["snr"] == pytest.approx(r["signal_sum"] / r["noise_sum"], rel=1e-12)


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_parallel_workers_give_the_same_table(tiny_model, tiny_snr_table, tmp_path, workers):
    threads = torch.get_num_threads()
    result = scan(tiny_model, tmp_path / "snr.parquet", model_id="tiny-llama", workers=workers)
    assert torch.get_num_threads() == threads  # the scan gives back the thread setting it changed
    assert without(rows_of(result.output), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


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
    partial_rows = [json.loads(line)["tensor_name"] for line in _partial(out).read_text().splitlines()[1:]]
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


# --- embedding roles ----------------------------------------------------------------------------


def _role_flags(rows):
    return (
        [r["tensor_name"] for r in rows if r["is_input_embedding"]],
        [r["tensor_name"] for r in rows if r["is_output_embedding"]],
    )


def test_roles_of_an_untied_llama(tiny_snr_table):
    assert _role_flags(rows_of(tiny_snr_table)) == (["model.embed_tokens.weight"], ["lm_head.weight"])


def test_roles_of_a_tied_llama(synthetic_model, tmp_path):
    model = synthetic_model(tie_word_embeddings=True)
    rows = scan(model, tmp_path / "snr.parquet").rows
    names = {r["tensor_name"] for r in rows}
    assert "lm_head.weight" not in names  # tied: the checkpoint stores the embedding once
    assert _role_flags(rows) == (["model.embed_tokens.weight"], ["model.embed_tokens.weight"])


def test_roles_of_qwen2(synthetic_model, tmp_path):
    model = synthetic_model(architecture="qwen2")
    rows = scan(model, tmp_path / "snr.parquet").rows
    assert _role_flags(rows) == (["model.embed_tokens.weight"], ["lm_head.weight"])
    biases = [r for r in rows if r["tensor_name"].endswith("_proj.bias")]
    assert len(biases) == 2 * 3 and all(not r["scanned"] and "1-D" in r["skip_reason"] for r in biases)


def test_roles_without_a_config_are_unflagged(tiny_model, tmp_path):
    model = tmp_path / "no-config"
    shutil.copytree(tiny_model, model)
    (model / "config.json").unlink()
    result = scan(model, tmp_path / "snr.parquet")
    assert _role_flags(result.rows) == ([], [])
    assert read_table_metadata(pq.read_table(result.output))["roles_source"].startswith("unavailable")


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


# --- resuming -----------------------------------------------------------------------------------




def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def test_interrupted_scan_resumes_to_the_same_table(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    assert not out.exists()
    lines = _partial(out).read_text().splitlines()
    assert len(lines) == 1 + 5
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 5
    assert not _partial(out).exists()
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_from_other_settings_is_discarded(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", estimator="gavish-donoho", workers=1)
    assert len(_partial(out).read_text().splitlines()) == 7
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama", estimator="reference")
    assert result.resumed == 0
    rows = rows_of(out)
    assert {r["estimator"] for r in rows if r["scanned"]} == {"reference"}
    assert without(rows, "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_from_other_weights_is_discarded(synthetic_model, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(synthetic_model(), model)
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        scan(model, out, model_id="m", workers=1)
    monkeypatch.undo()
    # the folder now holds other weights (another seed): nothing of the partial scan may be reused
    shutil.rmtree(model)
    shutil.copytree(synthetic_model(seed=1), model)
    result = scan(model, out, model_id="m")
    assert result.resumed == 0
    fresh = scan(synthetic_model(seed=1), tmp_path / "fresh.parquet", model_id="m")
    assert without(rows_of(out), "scan_seconds") == without(rows_of(fresh.output), "scan_seconds")


def test_partial_whose_last_line_is_cut_short_is_tolerated(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    monkeypatch.undo()
    with _partial(out).open("a") as handle:
        handle.write('{"model_id": "tiny-llama", "tensor_name": "model.layers.1.mlp.do')  # killed mid-write
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 4
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_partial_with_a_damaged_header_starts_over(tiny_model, tiny_snr_table, tmp_path):
    out = tmp_path / "snr.parquet"
    _partial(out).write_text('{"fingerpr\n{"tensor_name": "lm_head.weight", "snr": 123.0}\n')
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert result.resumed == 0
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_interrupted_parallel_scan_resumes_to_the_same_table(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=3)
    assert not out.exists()
    finished = len(_partial(out).read_text().splitlines()) - 1
    assert 0 <= finished <= 7  # rows are published in input order, up to the first unfinished matrix
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama", workers=3)
    assert result.resumed == finished
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


def test_rows_scanned_after_a_torn_line_survive_a_second_interruption(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    out = tmp_path / "snr.parquet"
    interrupt_scan_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    with _partial(out).open("a") as handle:
        handle.write('{"model_id": "tiny-llama", "tensor_na')
    monkeypatch.undo()
    interrupt_scan_after(monkeypatch, 3)  # three more rows, then another kill
    with pytest.raises(KeyboardInterrupt):
        scan(tiny_model, out, model_id="tiny-llama", workers=1)
    monkeypatch.undo()
    result = scan(tiny_model, out, model_id="tiny-llama")
    assert without(rows_of(out), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")
    assert result.resumed == 6


RESUME_SPEC = dict(
    hidden_size=1024,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1024,
)


@pytest.mark.integration
def test_killed_scan_subprocess_resumes(synthetic_model, tmp_path):
    """SIGKILL a real `python -m stages.snr_scan` mid-scan; the next run resumes and gives the same table."""
    model = synthetic_model(**RESUME_SPEC)  # 30 matrices of 1024 x 1024: a few seconds of exact SVDs
    out = tmp_path / "snr.parquet"
    partial = _partial(out)
    command = [sys.executable, "-m", "stages.snr_scan", str(model), "--out", str(out), "--model-id", "m"]
    command += ["--svd-method", "svd", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if partial.exists() and partial.read_text().count("\n") >= 3:  # header + at least 2 rows
                break
            time.sleep(0.005)
        assert process.poll() is None, f"the scan ended before it could be killed: {process.communicate()}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed scan must not leave a table that looks complete"
    assert not list(tmp_path.glob("*.parquet"))
    killed_rows = partial.read_text().count("\n") - 1
    assert killed_rows >= 2

    result = scan(model, out, model_id="m", svd_method="svd")
    assert result.resumed >= 2
    assert result.resumed <= 30 - 1
    assert not partial.exists()
    uninterrupted = scan(model, tmp_path / "uninterrupted.parquet", model_id="m", svd_method="svd")
    assert uninterrupted.resumed == 0
    assert without(rows_of(out), "scan_seconds") == without(rows_of(uninterrupted.output), "scan_seconds")


def test_a_decomposition_that_does_not_converge_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    from stages.base.errors import SpectrumError
    from stages.scan import engine

    def failing(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(engine, "singular_values", failing)
    with pytest.raises(SpectrumError, match=r"did not converge with --svd-method gram.*retry with the other --svd-method"):
        scan(tiny_model, tmp_path / "snr.parquet")
    assert not (tmp_path / "snr.parquet").exists()


# --- stacks of matrices (fused MoE experts) ----------------------------------------------------------


def test_fused_moe_experts_get_one_row_with_the_per_expert_snr(tmp_path, write_checkpoint):
    g = torch.Generator().manual_seed(11)
    experts = torch.randn(4, 48, 16, generator=g)
    experts[2] += 3 * torch.outer(torch.randn(48, generator=g), torch.randn(16, generator=g))  # one expert with a strong signal
    folder = write_checkpoint(
        tmp_path / "m",
        {"model.layers.0.mlp.experts.gate_up_proj": experts.to(torch.bfloat16), "model.layers.0.mlp.gate.weight": torch.randn(4, 16)},
    )
    result = scan(folder, tmp_path / "snr.parquet")
    row = next(r for r in result.rows if r["tensor_name"].endswith("gate_up_proj"))
    expected = [reference_snr(singular_values(m), 48, 16).snr for m in experts.to(torch.bfloat16).unbind(0)]
    assert row["scanned"] and row["shape"] == [4, 48, 16] and (row["rows"], row["cols"]) == (48, 16)
    assert row["slice_snr"] == pytest.approx(expected, rel=1e-12)
    assert row["snr"] == pytest.approx(sum(expected) / 4, rel=1e-12)
    assert row["singular_value_count"] == 4 * 16 and row["module_type"] == "mlp.experts.gate_up_proj"
    plain = next(r for r in result.rows if r["tensor_name"].endswith("gate.weight"))
    assert plain["slice_snr"] is None


def test_nan_in_one_expert_names_the_tensor_and_the_expert(tmp_path, write_checkpoint):
    experts = torch.randn(3, 20, 8)
    experts[1, 4, 2] = float("nan")
    folder = write_checkpoint(tmp_path / "m", {"model.layers.0.mlp.experts.down_proj": experts})
    with pytest.raises(CorruptWeightsError, match=r"'model.layers.0.mlp.experts.down_proj'.*1 NaN and 0 Inf.*\[1, 4, 2\]"):
        scan(folder, tmp_path / "snr.parquet")


def test_a_mixtral_checkpoint_scans_and_selects_its_fused_experts(synthetic_model, tmp_path):
    from stages import layer_select

    folder = synthetic_model(architecture="mixtral")
    result = scan(folder, tmp_path / "snr.parquet")
    stacks = [r for r in result.rows if len(r["shape"]) == 3]
    assert stacks and all(r["scanned"] and len(r["slice_snr"]) == r["shape"][0] for r in stacks)
    config = layer_select.SelectConfig(snr_input=str(result.output), out_dir=str(tmp_path / "sel"), top_percent=50)
    selection = layer_select.run(config, StageContext()).detail
    assert "# mlp.experts.gate_up_proj layers" in selection.yaml_text
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in selection.summary["trainable_tensors"])
