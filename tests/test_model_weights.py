"""Model folders: discovery, header validation and one-tensor reads; every bad input is a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.base.errors import CorruptWeightsError, InputError, SpectrumError
from stages.snr_scan import ScanConfig, run
from stages.weights.checkpoint import INDEX_FILE, ModelWeights
from stages.weights.decoding import decode

from .helpers import QUIET, hub_cache_snapshot


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.10.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
        "model.layers.2.mlp.up_proj.weight": torch.randn(24, 16, generator=g),
        "model.layers.2.input_layernorm.weight": torch.ones(16),
        "model.embed_tokens.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(40, 16, generator=g).to(torch.float16),
    }


# --- happy paths --------------------------------------------------------------------------------


def test_open_single_file_lists_tensors_in_natural_order(tmp_path, write_checkpoint):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    weights = ModelWeights.open(folder)
    assert weights.shards == ("model.safetensors",)
    assert [t.name for t in weights.tensors] == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
    ]
    info = {t.name: t for t in weights.tensors}
    assert info["lm_head.weight"].dtype == "F16" and info["lm_head.weight"].shape == (40, 16)
    assert info["model.embed_tokens.weight"].dtype == "BF16"
    assert info["model.layers.2.input_layernorm.weight"].shape == (16,)
    assert info["model.layers.2.input_layernorm.weight"].parameter_count == 16
    assert weights.parameter_count == 2 * 24 * 16 + 16 + 2 * 40 * 16


def _equal(values: np.ndarray, tensor: torch.Tensor) -> bool:
    """The values read equal the tensor's, bfloat16 compared in float32 (exactly)."""
    expected = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
    return values.shape == tuple(tensor.shape) and np.array_equal(values, expected.numpy())


def test_read_returns_the_stored_values_and_bytes(tmp_path, write_checkpoint):
    tensors = _tensors()
    weights = ModelWeights.open(write_checkpoint(tmp_path / "m", tensors))
    widened = {"F32": np.float32, "F16": np.float16, "BF16": np.float32}
    for info in weights.tensors:
        got = weights.read(info)
        assert got.dtype == widened[info.dtype]
        assert _equal(got, tensors[info.name])
        assert weights.read_raw(info).tobytes() == tensors[info.name].contiguous().view(torch.uint8).numpy().tobytes()
        if len(info.shape) == 2:
            assert _equal(weights.read(info, 3, 7), tensors[info.name][3:7])


def test_a_read_the_kernel_returns_in_pieces_is_completed(tmp_path, write_checkpoint, monkeypatch):
    """Linux returns at most ~2 GiB per read (a 7B model's float32 embedding is more): short reads are continued."""
    tensors = _tensors()
    weights = ModelWeights.open(write_checkpoint(tmp_path / "m", tensors))
    preadv = os.preadv
    calls = []

    def at_most_7_bytes(fd, buffers, offset):
        calls.append(offset)
        return preadv(fd, [buffers[0][:7]], offset)

    monkeypatch.setattr(os, "preadv", at_most_7_bytes)
    info = next(t for t in weights.tensors if t.name == "lm_head.weight")
    assert weights.read_raw(info).tobytes() == tensors[info.name].contiguous().view(torch.uint8).numpy().tobytes()
    assert len(calls) == -(-40 * 16 * 2 // 7)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.int8, torch.bool])
def test_every_bit_pattern_decodes_as_torch_does(dtype):
    """All 256 (or 65536) bit patterns: numpy's widened value equals torch's, NaN where torch has NaN."""
    width = torch.finfo(dtype).bits if dtype.is_floating_point else (8 if dtype != torch.bool else 1)
    count = 1 << width if width <= 16 else 0
    bits = torch.arange(count, dtype=torch.int32)
    stored = bits.to(torch.uint8 if width <= 8 else torch.int16).view(dtype) if dtype != torch.bool else bits.bool()
    raw = stored.contiguous().view(torch.uint8).numpy()
    safetensors_name = {
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.int8: "I8",
        torch.bool: "BOOL",
    }[dtype]
    got = decode(raw, safetensors_name, (count,))
    expected = stored.double().numpy()
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        np.testing.assert_array_equal(got.astype(np.float64), expected)  # assert_array_equal treats NaN == NaN


def test_an_unknown_dtype_is_a_clear_error():
    with pytest.raises(CorruptWeightsError, match=r"dtype 'F4' is not one this tool reads"):
        decode(np.zeros(4, dtype=np.uint8), "F4", (4,))


def test_open_sharded_checkpoint_with_index(tmp_path, write_checkpoint):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weights = ModelWeights.open(write_checkpoint(tmp_path / "m", tensors, shards=shards))
    assert weights.shards == tuple(shards)
    by_name = {t.name: t.shard for t in weights.tensors}
    for shard, members in shards.items():
        assert all(by_name[n] == shard for n in members)
    assert all(_equal(weights.read(t), tensors[t.name]) for t in weights.tensors)


def test_fingerprint_changes_when_a_shard_changes(tmp_path, write_checkpoint):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    before = ModelWeights.open(folder).fingerprint()
    assert ModelWeights.open(folder).fingerprint() == before
    write_checkpoint(folder, {**_tensors(), "extra.weight": torch.ones(2, 2)})
    assert ModelWeights.open(folder).fingerprint() != before


# --- bad folders ----------------------------------------------------------------------------------


def _expect(exc_type, folder: Path, *fragments: str):
    with pytest.raises(exc_type) as info:
        ModelWeights.open(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    _expect(InputError, missing, str(missing), "does not exist")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a folder")
    _expect(InputError, path, str(path), "not a folder")


def test_folder_without_safetensors(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    message = _expect(InputError, folder, str(folder), "no *.safetensors")
    assert "pickle" not in message


def test_folder_with_only_pickle_weights_mentions_pickle(tmp_path):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _expect(InputError, folder, "pytorch_model.bin", "pickle", "safetensors")


@pytest.mark.parametrize("keep", ["most", "header-only", "8-bytes", "3-bytes", "empty"])
def test_truncated_shard(tmp_path, write_checkpoint, keep):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"most": len(data) - 100, "header-only": header_end, "8-bytes": 8, "3-bytes": 3, "empty": 0}[keep]
    shard.write_bytes(data[:cut])
    _expect(CorruptWeightsError, folder, str(shard), "truncated or corrupt")


def test_garbage_shard(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    _expect(CorruptWeightsError, folder, "model.safetensors", "corrupt")


def test_shard_whose_header_is_not_a_safetensors_header(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    header = b'{"a": [1, 2, 3]}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    _expect(CorruptWeightsError, folder, "model.safetensors")


def test_one_bad_shard_among_good_ones_is_named(tmp_path, write_checkpoint):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    folder = write_checkpoint(tmp_path / "m", tensors, shards=shards)
    bad = folder / "model-00002-of-00002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7])
    message = _expect(CorruptWeightsError, folder, str(bad))
    assert "00001" not in message


def test_index_names_a_missing_shard(tmp_path, write_checkpoint):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    folder = write_checkpoint(tmp_path / "m", tensors, shards=shards)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _expect(CorruptWeightsError, folder, "model-00002-of-00002.safetensors", INDEX_FILE, "incomplete")


def test_index_lists_a_tensor_no_shard_contains(tmp_path, write_checkpoint):
    folder = write_checkpoint(tmp_path / "m", _tensors(), shards={"a.safetensors": sorted(_tensors())})
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = "a.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    _expect(CorruptWeightsError, folder, "model.layers.99.mlp.up_proj.weight")


def test_index_places_a_tensor_in_the_wrong_shard(tmp_path, write_checkpoint):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"a.safetensors": names[:2], "b.safetensors": names[2:]}
    folder = write_checkpoint(tmp_path / "m", tensors, shards=shards)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"][names[0]] = "b.safetensors"
    (folder / INDEX_FILE).write_text(json.dumps(index))
    _expect(CorruptWeightsError, folder, names[0], "a.safetensors", "b.safetensors")


def test_same_tensor_in_two_shards(tmp_path, write_checkpoint):
    tensors = _tensors()
    folder = tmp_path / "m"
    write_checkpoint(folder, tensors)
    write_checkpoint(tmp_path / "other", {"lm_head.weight": torch.zeros(40, 16)})
    (tmp_path / "other" / "model.safetensors").rename(folder / "model-extra.safetensors")
    _expect(CorruptWeightsError, folder, "'lm_head.weight'", "model-extra.safetensors")


MALFORMED_INDEXES = {
    "not-json": "this is not json",
    "a-list": "[1, 2]",
    "no-weight-map": '{"metadata": {}}',
    "weight-map-a-list": '{"weight_map": ["model.safetensors"]}',
    "weight-map-a-string": '{"weight_map": "model.safetensors"}',
    "weight-map-empty": '{"weight_map": {}}',
}


@pytest.mark.parametrize("content", list(MALFORMED_INDEXES.values()), ids=list(MALFORMED_INDEXES))
def test_malformed_index(tmp_path, write_checkpoint, content):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    (folder / INDEX_FILE).write_text(content)
    _expect(CorruptWeightsError, folder, str(folder / INDEX_FILE))


WEIGHT_MAP_BAD_VALUES = {
    "number": 1,
    "null": None,
    "list": ["model.safetensors"],
}


@pytest.mark.parametrize("value", list(WEIGHT_MAP_BAD_VALUES.values()), ids=list(WEIGHT_MAP_BAD_VALUES))
def test_index_with_non_string_shard_names(tmp_path, write_checkpoint, value):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    weight_map = {name: "model.safetensors" for name in _tensors()}
    weight_map["lm_head.weight"] = value
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    _expect(CorruptWeightsError, folder, str(folder / INDEX_FILE))


def test_index_that_is_binary_garbage(tmp_path, write_checkpoint):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    (folder / INDEX_FILE).write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    _expect(CorruptWeightsError, folder, str(folder / INDEX_FILE))


@pytest.mark.parametrize("escape", ["parent", "absolute"])
def test_index_cannot_point_outside_the_model_folder(tmp_path, write_checkpoint, escape):
    outside = write_checkpoint(tmp_path / "outside", _tensors()) / "model.safetensors"
    folder = tmp_path / "m"
    folder.mkdir()
    shard = "../outside/model.safetensors" if escape == "parent" else str(outside)
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {name: shard for name in _tensors()}}))
    _expect(CorruptWeightsError, folder, str(folder / INDEX_FILE))


# --- symbolic links: the Hugging Face hub cache, and links that leave the model folder ------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _sharded_files(tmp_path, write_checkpoint) -> dict[str, bytes]:
    """The files of a two-shard checkpoint with its index."""
    tensors = _tensors()
    names = sorted(tensors)
    folder = write_checkpoint(tmp_path / "src", tensors, shards={SHARDS[0]: names[:2], SHARDS[1]: names[2:]})
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_sharded_hub_cache_snapshot_opens_and_reads(tmp_path, write_checkpoint):
    """Every file of a hub snapshot (the index and each shard) is a link into its repository's blobs/."""
    snapshot = hub_cache_snapshot(tmp_path / "hub", "org/m", HUB_COMMIT, _sharded_files(tmp_path, write_checkpoint))
    assert all((snapshot / name).is_symlink() for name in (INDEX_FILE, *SHARDS))
    weights = ModelWeights.open(snapshot)
    assert weights.shards == tuple(SHARDS)
    tensors = _tensors()
    assert all(_equal(weights.read(t), tensors[t.name]) for t in weights.tensors)


def test_a_plain_folder_may_link_its_shards_inside_itself(tmp_path, write_checkpoint):
    files = _sharded_files(tmp_path, write_checkpoint)
    folder = tmp_path / "m"
    (folder / "store").mkdir(parents=True)
    for name, data in files.items():
        (folder / "store" / name).write_bytes(data)
        (folder / name).symlink_to(Path("store") / name)
    assert ModelWeights.open(folder).shards == tuple(SHARDS)


def _link_to_other_repo(tmp_path: Path, shard: Path) -> None:
    other = tmp_path / "hub" / "models--org--other" / "blobs" / "x"
    other.parent.mkdir(parents=True)
    other.write_bytes(shard.resolve().read_bytes())
    shard.unlink()
    shard.symlink_to(other)


def _link_out_of_the_cache(tmp_path: Path, shard: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(shard.resolve().read_bytes())
    shard.unlink()
    shard.symlink_to(outside)


@pytest.mark.parametrize("escape", [_link_to_other_repo, _link_out_of_the_cache], ids=["other-repository", "outside-the-cache"])
def test_a_hub_snapshot_shard_that_leaves_its_own_repository_is_refused(tmp_path, write_checkpoint, escape):
    snapshot = hub_cache_snapshot(tmp_path / "hub", "org/m", HUB_COMMIT, _sharded_files(tmp_path, write_checkpoint))
    shard = snapshot / "model-00002-of-00002.safetensors"
    escape(tmp_path, shard)
    with pytest.raises(CorruptWeightsError, match="model-00002-of-00002.safetensors.* points to .*, outside .*models--org--m"):
        ModelWeights.open(snapshot)


def test_a_snapshots_folder_outside_a_hub_repository_gets_no_wider_root(tmp_path, write_checkpoint):
    """Only `models--…/snapshots/<commit>` is a hub snapshot: any other folder's links must stay inside it."""
    snapshot = hub_cache_snapshot(tmp_path / "hub", "org/m", HUB_COMMIT, _sharded_files(tmp_path, write_checkpoint))
    impostor = tmp_path / "hub" / "models--org--m" / "not-snapshots" / HUB_COMMIT
    snapshot.parent.rename(impostor.parent)
    with pytest.raises(CorruptWeightsError, match=f"points to .*blobs.*, outside {impostor}"):
        ModelWeights.open(impostor)


def test_an_index_in_a_hub_snapshot_may_not_name_paths_above_it(tmp_path, write_checkpoint):
    files = _sharded_files(tmp_path, write_checkpoint)
    snapshot = hub_cache_snapshot(tmp_path / "hub", "org/m", HUB_COMMIT, files)
    index = json.loads(files[INDEX_FILE])
    blob = (snapshot / "model-00002-of-00002.safetensors").resolve()
    index["weight_map"] = {k: f"../../blobs/{blob.name}" if v.startswith("model-00002") else v for k, v in index["weight_map"].items()}
    (snapshot / INDEX_FILE).unlink()
    (snapshot / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptWeightsError, match=r"names shard '\.\./\.\./blobs/.*' outside the model folder"):
        ModelWeights.open(snapshot)


def test_shard_damaged_after_open_is_reported_on_read(tmp_path, write_checkpoint):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    weights = ModelWeights.open(folder)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    info = weights.tensors[-1]
    with pytest.raises(CorruptWeightsError) as raised:
        weights.read(info)
    assert repr(info.name) in str(raised.value) and str(shard) in str(raised.value)


# --- the scan leaves no table behind on any of these ------------------------------------------


def _damage_truncate(folder: Path) -> None:
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _damage_garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(os.urandom(2048))


def _damage_missing_shard(folder: Path) -> None:
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00009.safetensors"}}))


def _damage_bad_index(folder: Path) -> None:
    (folder / INDEX_FILE).write_text('{"weight_map": ["x"]}')


def _damage_pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")


@pytest.mark.parametrize(
    ("damage", "exc_type", "fragment"),
    [
        (_damage_truncate, CorruptWeightsError, "model.safetensors"),
        (_damage_garbage, CorruptWeightsError, "model.safetensors"),
        (_damage_missing_shard, CorruptWeightsError, "model-00009.safetensors"),
        (_damage_bad_index, CorruptWeightsError, INDEX_FILE),
        (_damage_pickle_only, InputError, "pickle"),
    ],
    ids=["truncated", "garbage", "missing-shard", "bad-index", "pickle-only"],
)
def test_scan_of_a_bad_checkpoint_writes_nothing(tmp_path, write_checkpoint, damage, exc_type, fragment):
    folder = write_checkpoint(tmp_path / "m", _tensors())
    damage(folder)
    out = tmp_path / "out" / "snr.parquet"
    reference = tmp_path / "out" / "snr.json"
    with pytest.raises(exc_type, match=fragment.replace(".", r"\.")) as raised:
        run(ScanConfig(model_dir=str(folder), output=str(out), reference_json=str(reference)), QUIET)
    assert isinstance(raised.value, SpectrumError) and raised.value.exit_code != 0
    assert not out.exists() and not reference.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_scan_of_a_missing_folder_writes_nothing(tmp_path, kind):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("x")
    out = tmp_path / "snr.parquet"
    with pytest.raises(InputError, match=str(target)):
        run(ScanConfig(model_dir=str(target), output=str(out)), QUIET)
    assert not out.exists()
    assert not (tmp_path / "snr.parquet.partial.jsonl").exists()
