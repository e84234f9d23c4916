"""Proof of what training changed, read from the safetensors files before and after (not from memory).

One row per tensor of the base checkpoint: trainable, parameter count, sha256 of its bytes before
and after, changed, and the relative change ‖ΔW‖/‖W‖. A frozen tensor that changed is an error, and
so is a changed tensor that holds NaN or infinity in the saved files (not only in memory: a value
beyond the range of fp16 becomes infinite when saved in the base model's dtype).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..base.errors import SpectrumError
from ..weights.checkpoint import ModelWeights
from ..weights.decoding import decode
from .settings import TrainingDivergedError

TRAINED_TENSORS_SCHEMA = pa.schema(
    [
        ("tensor_name", pa.string()),
        ("trainable", pa.bool_()),
        ("parameter_count", pa.int64()),
        ("dtype", pa.string()),
        ("sha256_before", pa.string()),
        ("sha256_after", pa.string()),
        ("changed", pa.bool_()),
        ("relative_change", pa.float64()),
    ]
)


class FrozenTensorChangedError(SpectrumError):
    """A tensor that was frozen differs after training: the run cannot be trusted."""

    exit_code = 3


def audit_tensors(before_dir: Path, after_dir: Path, trainable: set[str]) -> pa.Table:
    """The trained_tensors table; raises FrozenTensorChangedError when a frozen tensor changed."""
    before, after = ModelWeights.open(before_dir), ModelWeights.open(after_dir)
    after_infos = {info.name: info for info in after.tensors}
    rows = []
    non_finite: list[str] = []
    for info in before.tensors:
        old_raw = before.read_raw(info)
        new_info = after_infos.get(info.name)
        new_raw = after.read_raw(new_info) if new_info is not None else None
        old_digest = hashlib.sha256(old_raw).hexdigest()
        new_digest = hashlib.sha256(new_raw).hexdigest() if new_raw is not None else None
        changed = new_digest != old_digest
        relative = None
        old = decode(old_raw, info.dtype, info.shape)
        new = decode(new_raw, new_info.dtype, new_info.shape) if new_info is not None else None
        if new is not None and new.shape == old.shape:
            delta = float(np.linalg.norm((new.astype(np.float64) - old.astype(np.float64)).ravel()))
            norm = float(np.linalg.norm(old.astype(np.float64).ravel()))
            relative = delta / norm if norm > 0 else (0.0 if delta == 0 else float("inf"))
        rows.append(
            {
                "tensor_name": info.name,
                "trainable": info.name in trainable,
                "parameter_count": info.parameter_count,
                "dtype": info.dtype,
                "sha256_before": old_digest,
                "sha256_after": new_digest,
                "changed": changed,
                "relative_change": relative,
            }
        )
        if changed and new is not None and _finite(old) and not _finite(new):
            non_finite.append(f"{info.name} ({info.dtype})")
    if non_finite:  # e.g. trained values beyond the range of the base model's fp16
        raise TrainingDivergedError(
            f"the trained model's files hold NaN or infinite values in {len(non_finite)} tensor(s) ({', '.join(non_finite[:5])}); "
            "nothing was committed: lower --learning-rate, or train a base model whose dtype holds the trained values"
        )
    table = pa.Table.from_pylist(rows, schema=TRAINED_TENSORS_SCHEMA)
    broken = [r["tensor_name"] for r in rows if r["changed"] and not r["trainable"]]
    if broken:
        raise FrozenTensorChangedError(
            f"{len(broken)} frozen tensor(s) changed during training ({', '.join(broken[:5])}); the run is not trusted "
            "and nothing was committed"
        )
    return table


def _finite(values: np.ndarray) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
