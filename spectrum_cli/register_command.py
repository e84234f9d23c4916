"""`spectrum register RUN --mlflow-model NAME`: a trained model in the MLflow model registry (stages/tracking/registry.py)."""

from __future__ import annotations

import argparse

from stages.base.errors import InputError
from stages.core.cli import add_store_location_arguments, add_tracking_arguments, require_store
from stages.store import succeeded_manifest
from stages.tracking import target_from_settings
from stages.tracking.registry import PRODUCTION_ALIAS, check_model_name, register_model

from .card_command import add_card_source_arguments, card_of_args

DESCRIPTION = f"""Registers the model a cpt or sft step of RUN trained as a new version of the registered model
--mlflow-model NAME on the MLflow server (--mlflow-tracking-uri, else $MLFLOW_TRACKING_URI).

The version's description is the model card (`spectrum card RUN`: selection, trained tensors with their
SNR, evaluation with deltas, GPU-hours); tags name our run id, the step and the sha256 of the model's
files. Files in an S3 store are registered by reference (the model folder's s3:// URI: runs are never
overwritten and a large model is not copied); files in a local store are uploaded as the MLflow run's
artifacts (a local path means nothing to another machine). The version is linked to the training
stage's own MLflow run when the stage was tracked there. When the model is a model line's promoted
production model, the version gets the alias `{PRODUCTION_ALIAS}`. Registering the same run and step
again adds no version (the alias is still set)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_card_source_arguments(parser)
    parser.add_argument("--mlflow-model", metavar="NAME", required=True, help="the registered model's name in MLflow")
    add_tracking_arguments(parser, parent=False)
    add_store_location_arguments(parser)


def run(args: argparse.Namespace) -> str:
    target = target_from_settings(args.mlflow_tracking_uri, args.mlflow_experiment)
    if target is None:
        raise InputError("no MLflow server to register in: pass --mlflow-tracking-uri URI (or set $MLFLOW_TRACKING_URI)")
    check_model_name(args.mlflow_model)  # before the store is read
    store = require_store(args, writable=False)
    run_id, step, card = card_of_args(args, store)
    manifest = succeeded_manifest(store, run_id, step, "trained model to register")
    registered = register_model(target, store, manifest, args.mlflow_model, card)
    how = "by reference" if registered.by_reference else "with its files as artifacts"
    verb = "was registered already as" if registered.already else "registered as"
    lines = [f"{run_id}/{step} {verb} {registered.name} version {registered.version} ({how}: {registered.source})"]
    if registered.aliases:
        lines.append(f"alias {PRODUCTION_ALIAS} -> version {registered.version}: the production model of line {registered.line}")
    return "\n".join(lines)
