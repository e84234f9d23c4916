"""A model folder's safetensors weights: discovery, validation, and one-tensor-at-a-time reads.

Each read copies one tensor (or a block of its rows) out of the shard with a plain positioned
read: nothing stays mapped, so memory never accumulates the pages of tensors read earlier and
peak memory stays near one tensor. Reading needs numpy only (no torch): the stored bytes, for
digests, and their values widened exactly to a numpy dtype (stages.weights.decoding).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..base.errors import CorruptWeightsError, InputError
from ..base.files import link_roots, require_inside
from .decoding import decode, element_size
from .naming import natural_key

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    data_offset: int = 0  # where the tensor's bytes start in its shard
    shard_size: int = 0  # the shard's size in bytes when its header was read (0: not checked)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the first axis) as stored."""
        count = element_size(self.dtype)
        for dim in self.shape[1:]:
            count *= dim
        return count

    @property
    def parameter_count(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class ModelWeights:
    root: Path
    shards: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]

    @classmethod
    def open(cls, model_dir: str | Path) -> ModelWeights:
        """Validate the folder and read every shard's header (no tensor data is read)."""
        root = Path(model_dir)
        if not root.exists():
            raise InputError(f"model folder {root} does not exist; pass a Hugging Face model folder with safetensors weights")
        if not root.is_dir():
            raise InputError(f"{root} is not a folder; pass the model folder that holds the *.safetensors files")
        shards, expected = _shard_list(root)
        tensors: list[TensorInfo] = []
        seen: dict[str, str] = {}
        for shard in shards:
            for info in _read_header(root, shard):
                if info.name in seen:
                    raise CorruptWeightsError(
                        f"tensor {info.name!r} appears in both {seen[info.name]} and {shard} in {root}; the checkpoint is inconsistent"
                    )
                if expected is not None and expected.get(info.name, shard) != shard:
                    raise CorruptWeightsError(
                        f"{INDEX_FILE} in {root} places {info.name!r} in {expected[info.name]} but it is stored in {shard}"
                    )
                seen[info.name] = shard
                tensors.append(info)
        if expected is not None:
            missing = sorted(set(expected) - set(seen), key=natural_key)
            if missing:
                raise CorruptWeightsError(
                    f"{INDEX_FILE} in {root} lists {len(missing)} tensor(s) no shard contains, e.g. {missing[0]!r}; re-download the model"
                )
        tensors.sort(key=lambda t: natural_key(t.name))
        return cls(root=root, shards=tuple(shards), tensors=tuple(tensors))

    def files(self) -> list[str]:
        """The files a scan reads: the shards, the index, and config.json (for embedding roles)."""
        extra = [name for name in (INDEX_FILE, "config.json") if (self.root / name).is_file()]
        return [*self.shards, *extra]

    @property
    def parameter_count(self) -> int:
        return sum(t.parameter_count for t in self.tensors)

    def structure(self) -> str:
        """structure_fingerprint of this checkpoint's tensors."""
        return structure_fingerprint((t.name, t.shape) for t in self.tensors)

    def fingerprint(self) -> str:
        """Identity of the checkpoint files (names, sizes, modification times) for resuming."""
        digest = hashlib.sha256()
        for shard in self.shards:
            stat = (self.root / shard).stat()
            digest.update(f"{shard}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def read_raw(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored bytes (uint8) of rows [start, stop) of a tensor (all of it by default)."""
        stop = (info.shape[0] if info.shape else 1) if stop is None else stop
        size = (stop - start) * info.row_bytes  # a 0-D tensor: one "row" of one element
        path = self.root / info.shard
        buffer = np.empty(size, dtype=np.uint8)
        try:
            with path.open("rb", buffering=0) as handle:
                found = os.fstat(handle.fileno()).st_size
                if info.shard_size and found != info.shard_size:
                    raise CorruptWeightsError(
                        f"cannot read tensor {info.name!r} from {path}: the shard is {found} bytes, its header says "
                        f"{info.shard_size}; it was truncated or replaced since it was opened; re-download the shard"
                    )
                got = _read_into(handle.fileno(), memoryview(buffer), info.data_offset + start * info.row_bytes)
        except OSError as exc:
            raise CorruptWeightsError(f"cannot read tensor {info.name!r} from {path}: {exc}; re-download the shard") from exc
        if got != size:
            raise CorruptWeightsError(f"cannot read tensor {info.name!r} from {path}: the file ends early; re-download the shard")
        return buffer

    def read(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor (all of it by default), widened exactly to a numpy dtype."""
        raw = self.read_raw(info, start, stop)
        rows = (info.shape[0] if stop is None else stop) - start if info.shape else None
        return decode(raw, info.dtype, (rows, *info.shape[1:]) if info.shape else ())


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset` with positioned reads; the bytes read (fewer at the end of the file).

    One read returns at most ~2 GiB on Linux (a 7B model's float32 embedding is larger), so it loops.
    """
    got = 0
    while got < len(view):
        count = os.preadv(fd, [view[got:]], offset + got)
        if count == 0:
            break
        got += count
    return got


def _shard_list(root: Path) -> tuple[list[str], dict[str, str] | None]:
    index_path = root / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, OSError) as exc:  # ValueError covers bad JSON and bad UTF-8
            raise CorruptWeightsError(f"{index_path} is not a valid safetensors index (needs a 'weight_map' object): {exc}") from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptWeightsError(f"{index_path} has an empty or malformed 'weight_map'")
        roots = link_roots(root)  # a hub-cache snapshot's shards are links into its repository's blobs/
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or not name:
                raise CorruptWeightsError(f"{index_path} maps {name!r} to {shard!r}; every entry must name a shard file")
            if Path(shard).is_absolute() or os.path.normpath(shard).split(os.sep)[0] == "..":
                raise CorruptWeightsError(
                    f"{index_path} names shard {shard!r} outside the model folder; refusing to read it: an index names "
                    "its shards by paths inside the model folder; fix the index or re-download the model"
                )
            require_inside(
                root / shard,
                roots,
                f"shard {shard!r} named by {index_path}",
                "refusing to read it: an index may only name shards inside the model folder (or, for a Hugging Face "
                "hub-cache snapshot, inside its own cache repository); fix the index or re-download the model",
                CorruptWeightsError,
            )
        shards = sorted(set(weight_map.values()), key=natural_key)
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CorruptWeightsError(
                f"{index_path} names shard(s) that are not in {root}: {', '.join(missing)}; the download is incomplete"
            )
        return shards, dict(weight_map)
    shards = sorted((p.name for p in root.glob("*.safetensors")), key=natural_key)
    if not shards:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f" It has pickle weights ({', '.join(pickles)}), which are not read because loading them can run arbitrary code;"
            " convert them to safetensors first."
            if pickles
            else ""
        )
        raise InputError(f"no *.safetensors weights in {root}.{hint}")
    return shards, None


def _read_header(root: Path, shard: str) -> list[TensorInfo]:
    path = root / shard
    try:
        with safe_open(str(path), framework="numpy") as handle:  # validates the header against the file
            offsets, size = _data_offsets(path)
            infos = []
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                view = handle.get_slice(name)
                shape = tuple(view.get_shape())
                infos.append(
                    TensorInfo(name=name, shard=shard, dtype=view.get_dtype(), shape=shape, data_offset=offsets[name], shard_size=size)
                )
            return infos
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CorruptWeightsError(f"shard {path} is truncated or corrupt ({exc}); re-download it") from exc


def _data_offsets(path: Path) -> tuple[dict[str, int], int]:
    """Where each tensor's bytes start in a safetensors file (an 8-byte header length, the JSON header, then the data), and its size."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        size = os.fstat(handle.fileno()).st_size
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}, size


def structure_fingerprint(tensors: Iterable[tuple[str, Sequence[int]]]) -> str:
    """sha256 of every tensor's name and shape: the same for a model and any fine-tune of it, different for another model."""
    lines = sorted(f"{name}:{','.join(str(d) for d in shape)}" for name, shape in tensors)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
