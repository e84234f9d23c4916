"""The snr_scan stage: the table it writes, checkpoint layouts and dtypes, parallel workers, embedding roles, stacked experts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from stages.base.errors import CorruptWeightsError
from stages.core.stage import StageContext
from stages.scan.estimators import reference_snr
from stages.scan.spectra import singular_values
from stages.scan.table import SNR_SCHEMA, load_reference_json, read_table_metadata
from stages.weights.checkpoint import INDEX_FILE

from .helpers import LLAMA_TYPES, by_name, rows_of, scan, without

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


def test_tall_matrices_are_read_a_block_of_rows_at_a_time(tiny_model, tiny_snr_table, tmp_path, monkeypatch):
    """An embedding is never in memory whole: its rows stream into the Gram matrix, and the digest and scores are unchanged."""
    from stages.scan import spectra
    from stages.weights.checkpoint import ModelWeights

    read_whole, blocks = [], {}
    real_read_raw = ModelWeights.read_raw

    def read_raw(self, info, start=0, stop=None):
        if stop is None:
            read_whole.append(info)
        else:
            blocks.setdefault(info.name, []).append((start, stop))
        return real_read_raw(self, info, start, stop)

    monkeypatch.setattr(ModelWeights, "read_raw", read_raw)
    monkeypatch.setattr(spectra, "BLOCK_ELEMENTS", 64 * 7)  # a few rows per block, the last block partial
    result = scan(tiny_model, tmp_path / "snr.parquet", model_id="tiny-llama")
    reference = by_name(rows_of(tiny_snr_table))
    for row in rows_of(result.output):
        if not row["scanned"]:
            continue
        rows, cols = row["shape"]
        assert (row["tensor_name"] in blocks) == (rows >= cols)
        if rows >= cols:
            spans = blocks[row["tensor_name"]]
            assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == rows
            assert all(previous[1] == following[0] for previous, following in zip(spans, spans[1:], strict=False))
        expected = reference[row["tensor_name"]]
        assert row["tensor_sha256"] == expected["tensor_sha256"]
        assert row["snr"] == pytest.approx(expected["snr"], rel=1e-10)
    assert all(info.shape[0] < info.shape[1] for info in read_whole if len(info.shape) == 2)


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_parallel_workers_give_the_same_table(tiny_model, tiny_snr_table, tmp_path, workers):
    from threadpoolctl import threadpool_info

    threads = [pool["num_threads"] for pool in threadpool_info()]
    result = scan(tiny_model, tmp_path / "snr.parquet", model_id="tiny-llama", workers=workers)
    assert [pool["num_threads"] for pool in threadpool_info()] == threads  # the scan gives back the thread setting it changed
    assert without(rows_of(result.output), "scan_seconds") == without(rows_of(tiny_snr_table), "scan_seconds")


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


def test_roles_are_cached_and_a_cpu_scan_with_cached_roles_imports_no_torch(tiny_model, tmp_path):
    """The second scan reads the roles back (no transformers, no torch in the process) and writes the same table."""
    cache = tmp_path / "cache"
    env = {**os.environ, "SPECTRUM_CACHE": str(cache)}
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['scan', sys.argv[1], '--out', sys.argv[2], '--no-progress']\n"
        "try:\n    runpy.run_module('stages.snr_scan', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'deepspeed') if m in sys.modules))\n"
    )
    imported = []
    for name in ("first", "second"):
        done = subprocess.run(
            [sys.executable, "-c", probe, str(tiny_model), str(tmp_path / f"{name}.parquet")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        imported.append(done.stdout.strip().splitlines()[-1])
    assert imported == ["['torch', 'transformers']", "[]"]
    assert len(list((cache / "roles").glob("*.json"))) == 1
    first, second = rows_of(tmp_path / "first.parquet"), rows_of(tmp_path / "second.parquet")
    assert without(second, "scan_seconds") == without(first, "scan_seconds")
    assert _role_flags(second) == (["model.embed_tokens.weight"], ["lm_head.weight"])


@pytest.mark.parametrize("damage", [b"{not json", b'{"input_embeddings": 5}', b'{"input_embeddings": ["no.such.tensor"]}'])
def test_a_damaged_roles_cache_entry_is_resolved_again(tiny_model, tmp_path, damage):
    from stages.weights.checkpoint import ModelWeights
    from stages.weights.roles import roles_from_model_config

    names = [t.name for t in ModelWeights.open(tiny_model).tensors]
    resolved = roles_from_model_config(tiny_model, names)
    (entry,) = _entries_for(tiny_model, names)
    entry.write_bytes(damage)
    assert roles_from_model_config(tiny_model, names) == resolved
    assert json.loads(entry.read_bytes()) == {role: list(found) for role, found in resolved.tensors.items()}


def test_the_roles_cache_is_keyed_by_the_config_and_tensor_names(tiny_model, tmp_path):
    from stages.weights.checkpoint import ModelWeights
    from stages.weights.roles import roles_from_model_config

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    names = [t.name for t in ModelWeights.open(tiny_model).tensors]
    untied_roles = roles_from_model_config(tiny_model, names)
    tied_roles = roles_from_model_config(tied, [n for n in names if n != "lm_head.weight"])
    assert untied_roles.names("output_embeddings") == ("lm_head.weight",)
    assert tied_roles.names("output_embeddings") == ("model.embed_tokens.weight",)  # another key: not the untied entry
    assert _entries_for(tiny_model, names) != _entries_for(tied, [n for n in names if n != "lm_head.weight"])


def test_an_unwritable_roles_cache_only_costs_the_next_scan(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("SPECTRUM_CACHE", str(blocker))
    result = scan(tiny_model, tmp_path / "snr.parquet")
    assert _role_flags(result.rows) == (["model.embed_tokens.weight"], ["lm_head.weight"])


def test_an_unreadable_config_leaves_the_roles_unavailable_and_says_why(tiny_model, monkeypatch):
    from stages.weights.checkpoint import ModelWeights
    from stages.weights.roles import roles_from_model_config

    read_bytes = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path.name == "config.json":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    roles = roles_from_model_config(tiny_model, [t.name for t in ModelWeights.open(tiny_model).tensors])
    assert roles.tensors == {} and roles.source.startswith("unavailable: config.json could not be read ([Errno 13] Permission denied")


def _entries_for(model: Path, names: list[str]) -> list[Path]:
    from stages.weights.roles import _cache_entry

    entry = _cache_entry((model / "config.json").read_bytes(), names)
    return [entry] if entry.exists() else []


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
