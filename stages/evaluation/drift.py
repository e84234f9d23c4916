"""SNR drift: each tensor's SNR in the base model and in the trained one, from two snr_scan tables.

A tensor whose bytes did not change (same tensor_sha256 in both scans) must have exactly the same
SNR — the scan is deterministic — so a frozen tensor showing drift is an error, not a row.
"""

from __future__ import annotations

import math

import pyarrow as pa

from ..base.errors import InputError, SpectrumError

SNR_DRIFT_SCHEMA = pa.schema(
    [
        ("tensor_name", pa.string()),
        ("module_type", pa.string()),
        ("layer_index", pa.int64()),
        ("parameter_count", pa.int64()),
        ("changed", pa.bool_()),  # the tensor's bytes differ after training
        ("snr_before", pa.float64()),
        ("snr_after", pa.float64()),
        ("snr_change", pa.float64()),  # after - before
        ("relative_snr_change", pa.float64()),  # (after - before) / before
        ("sha256_before", pa.string()),
        ("sha256_after", pa.string()),
    ]
)


class FrozenSnrDriftError(SpectrumError):
    """A tensor with identical bytes scanned to a different SNR: the scans cannot be trusted."""

    exit_code = 3


def snr_drift(before: pa.Table, after: pa.Table) -> pa.Table:
    """One row per scanned matrix of the base model; raises when the models differ or a frozen tensor drifted."""
    rows_before = {r["tensor_name"]: r for r in before.to_pylist() if r["scanned"]}
    rows_after = {r["tensor_name"]: r for r in after.to_pylist() if r["scanned"]}
    if set(rows_before) != set(rows_after):
        missing = sorted(set(rows_before) ^ set(rows_after))[:5]
        raise InputError(f"the base and trained models have different matrices (e.g. {', '.join(missing)}): not a model and its training")
    rows = []
    for name, old in rows_before.items():
        new = rows_after[name]
        changed = old["tensor_sha256"] != new["tensor_sha256"]
        if not changed and not _same(old["snr"], new["snr"]):
            raise FrozenSnrDriftError(
                f"{name} is unchanged (sha256 {old['tensor_sha256'][:12]}…) but its SNR moved: {old['snr']} -> {new['snr']}"
            )
        change = new["snr"] - old["snr"]
        rows.append(
            {
                "tensor_name": name,
                "module_type": old["module_type"],
                "layer_index": old["layer_index"],
                "parameter_count": old["parameter_count"],
                "changed": changed,
                "snr_before": old["snr"],
                "snr_after": new["snr"],
                "snr_change": change,
                "relative_snr_change": change / old["snr"] if old["snr"] else None,
                "sha256_before": old["tensor_sha256"],
                "sha256_after": new["tensor_sha256"],
            }
        )
    return pa.Table.from_pylist(rows, schema=SNR_DRIFT_SCHEMA)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
