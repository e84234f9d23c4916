"""The embedded-default demo: generate a small model, scan it with both estimators, select layers."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import layer_select, snr_scan
from stages.synthetic_model import SyntheticSpec, write_synthetic_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-run", help="folder for the generated model and all outputs (default: demo-run)")
    parser.add_argument("--top-percent", type=float, default=50.0, help="per-type share of matrices to train (default 50)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the generated Llama model (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier demo run in the same folder")


def run(args: argparse.Namespace) -> str:
    workdir = Path(args.workdir)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists() or args.overwrite:
        write_synthetic_model(model_dir, SyntheticSpec(num_hidden_layers=args.layers, max_shard_bytes=4_000_000))
    lines = [f"model: {model_dir} (synthetic Llama, {args.layers} layers, sharded safetensors)"]
    for estimator in ("reference", "gavish-donoho"):
        table = workdir / f"snr-{estimator}.parquet"
        scan = snr_scan.run(
            snr_scan.ScanConfig(
                model_dir=str(model_dir),
                output=str(table),
                model_id="demo-llama",
                estimator=estimator,
                reference_json=str(workdir / f"snr_results_demo-llama-{estimator}.json"),
                overwrite=args.overwrite,
            )
        )
        selection = layer_select.run(
            layer_select.SelectConfig(
                snr_input=str(table), out_dir=str(workdir / f"selection-{estimator}"), top_percent=args.top_percent, overwrite=args.overwrite
            )
        )
        lines.append(f"[{estimator}] {snr_scan.report(scan)}")
        lines.append(f"[{estimator}] {layer_select.report(selection)}")
    lines.append(f"read the tables with pandas: pandas.read_parquet('{workdir}/snr-reference.parquet')")
    return "\n".join(lines)
