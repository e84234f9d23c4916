"""The Prefect pipeline: real Prefect (ephemeral API), a real S3 server; one run id; cached and single-stage re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.pipeline_config import load_pipeline_config, parse_pipeline_config
from stages.base.errors import InputError
from stages.evaluation.corpus import python_docs
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import EOS, domain_corpus, write_tokenizer
from stages.store import list_runs, load_manifest, open_store, read_stage_output
from stages.store.trees import local_copy

from .helpers import TINY
from .s3_server import fresh_bucket

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    logs = domain_corpus(160, seed=4)
    model = write_tokenizer(write_synthetic_model(root / "model", SyntheticSpec(**TINY)), logs, TINY["vocab_size"])
    (model / "chat_template.jinja").write_text(TEMPLATE)
    (root / "drop").mkdir()
    (root / "drop" / "logs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in logs))
    (root / "chats").mkdir()
    rows = [{"prompt": "status?", "completion": t} for t in domain_corpus(40, seed=5)]
    (root / "chats" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "general.txt").write_text("\n".join(python_docs().texts[:60]) + "\n")
    return root


def write_config(folder: Path, inputs: Path, store: str, execution: str | dict = "in-process", **stages) -> Path:
    document = {
        "execution": execution,
        "model": str(inputs / "model"),
        "data": str(inputs / "drop"),
        "store": store,
        "stages": {
            "layer_select": {"top_percent": 50},
            "cpt": {"max_steps": 3, "seq_len": 64, "save_steps": 0, "learning_rate": 3e-3, "warmup_steps": 0},
            "sft": {
                "data": str(inputs / "chats"),
                "max_steps": 2,
                "seq_len": 64,
                "save_steps": 0,
                "heldout_percent": 25,
                "learning_rate": 3e-3,
                "warmup_steps": 0,
            },
            "evaluate": {"seq_len": 64, "max_tokens": 512, "general": str(inputs / "general.txt")},
            **stages,
        },
    }
    document["stages"] = {name: options for name, options in document["stages"].items() if options is not None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(document))
    return folder / "pipeline.yaml"


@pytest.mark.integration
def test_the_pipeline_runs_every_stage_under_one_run_on_s3_and_reruns_are_cached(prefect_api, s3_env, inputs, tmp_path):
    from flows.pipeline import pipeline_flow

    store_uri = f"s3://{fresh_bucket()}/spectrum"
    config = write_config(tmp_path, inputs, store_uri)
    first = pipeline_flow(str(config), run="p1")
    stages = ["download", "snr_scan", "layer_select", "cpt", "sft", "evaluate"]
    assert first["ran"] == stages and first["cached"] == [] and first["run_id"] == "p1"
    store = open_store(store_uri)
    runs = list_runs(store)
    # evaluate.sft rescans the cpt model (its base) and the sft model; evaluate then finds both scans it needs done, and
    # records them as its own steps (reuse records: every step of the run can be named as RUN/STEP).
    # Each model's number on each dataset is a step: evaluate finds the cpt model's general perplexity measured (by evaluate.sft)
    assert runs["p1"] == [
        "download", "snr_scan", "snr_scan.evaluate", "snr_scan.evaluate_base", "snr_scan.evaluate_sft", "snr_scan.evaluate_sft_base",
        "layer_select", "cpt", "sft", "evaluate",
        "evaluate.measure_base_general-general-txt", "evaluate.measure_base_heldout", "evaluate.measure_trained_general-general-txt",
        "evaluate.measure_trained_heldout",
        "evaluate.sft", "evaluate.sft_measure_base_chat", "evaluate.sft_measure_base_general-general-txt",
        "evaluate.sft_measure_trained_chat", "evaluate.sft_measure_trained_general-general-txt",
    ], " ".join(runs["p1"])  # fmt: skip
    assert Path(first["report"]).is_file() and "Spectrum report: run" in Path(first["report"]).read_text()
    from prefect import get_client

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts() if a.key}
    for name in ("snr", "selection", "trained-tensors", "evaluation", "report"):
        assert f"{name}-p1" in first["artifacts"] and f"{name}-p1" in artifacts
    assert artifacts["report-p1"].type == "markdown" or "report.html" in str(artifacts["report-p1"].data)
    sft_evaluation = load_manifest(store, "p1", "evaluate.sft")
    assert any(ref["uri"].endswith("runs/p1/sft/heldout.jsonl") for ref in sft_evaluation.inputs)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Prefect shows the pipeline: a task run per step, named after it, waiting on the steps whose outputs it takes
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["flow_run_id"]])))
    names = {str(run.id): run.name for run in task_runs}
    upstream = {run.name: sorted(names[str(i.id)] for i in run.task_inputs.get("wait_for", [])) for run in task_runs}
    assert upstream == {
        "download": [], "snr_scan": ["download"], "layer_select": ["snr_scan"], "cpt": ["download", "layer_select"],
        "sft": ["cpt", "layer_select"], "evaluate.sft": ["sft"], "evaluate": ["cpt"],
    }, upstream  # fmt: skip

    again = pipeline_flow(str(config), run="p2")  # a cached re-run skips every stage, and records where each came from
    assert again["cached"] == stages and set(again["stages"].values()) == {"p1"}
    assert load_manifest(store, "p2", "cpt").run_id == "p1"
    # p2's stages are read where p1 wrote them: its model, its records
    folder, refs = local_copy("store:runs/p2/cpt/model", store)
    assert (folder / "model.safetensors").is_file() and refs["model.safetensors"]["uri"].endswith("runs/p1/cpt/model/model.safetensors")
    assert read_stage_output(store, "p2", "cpt", "training.json", "training record")[1].uri.endswith("runs/p1/cpt/training.json")

    # one stage again, on p1's committed upstream outputs: nothing upstream is recomputed
    write_config(tmp_path, inputs, store_uri, evaluate={"seq_len": 64, "max_tokens": 256, "general": str(inputs / "general.txt")})
    only = pipeline_flow(str(config), run="p1", only="evaluate")
    assert only["ran"] == ["evaluate"] and only["cached"] == []
    rerun = only["run_id"]  # a new run: its upstream stages are p1's, recorded; its evaluate is new
    assert load_manifest(store, rerun, "evaluate").parameters["max_tokens"] == 256
    assert load_manifest(store, rerun, "cpt").run_id == "p1" and load_manifest(store, "p1", "evaluate").parameters["max_tokens"] == 512
    assert {s for s in list_runs(store)[rerun] if "." not in s} == {"download", "snr_scan", "layer_select", "cpt", "sft", "evaluate"}


@pytest.mark.integration
def test_a_pipeline_killed_during_cpt_resumes_from_its_checkpoint(inputs, tmp_path):
    """SIGTERM (how Prefect, Docker and Kubernetes stop a run) mid-training; the next pipeline run continues from the checkpoint."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    from .helpers import child_env, venv_bin

    store_dir = tmp_path / "store"
    cpt_options = {"max_steps": 300, "seq_len": 64, "micro_batch_size": 4, "save_steps": 2, "learning_rate": 3e-3}
    config = write_config(tmp_path, inputs, str(store_dir), sft=None, cpt=cpt_options)
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [venv_bin("spectrum"), "pipeline", "run", str(config), "--run", "killed"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (store_dir / "runs/killed/cpt/checkpoints/step-4/complete.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # the pipeline process only: its temporary Prefect server must outlive the stage
    try:
        out, err = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    store = open_store(str(store_dir))
    assert load_manifest(store, "killed", "cpt").status == "failed"

    again = [venv_bin("spectrum"), "pipeline", "run", str(config), "--run", "resumed"]
    done = subprocess.run(again, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((store_dir / "runs/resumed/cpt/training.json").read_text())
    assert training["resumed_from_step"] >= 4 and training["steps"] == 300
    assert {"download", "snr_scan", "layer_select"} <= set(list_runs(store)["resumed"])  # reused, recorded


@pytest.mark.integration
def test_stages_configured_as_subprocesses_run_their_container_command(prefect_api, inputs, tmp_path, monkeypatch):
    """cpt, sft and both evaluations run as `python -m stages.<stage> …`; the pipeline's own process never runs them."""
    from dataclasses import replace

    from flows import pipeline_config
    from flows.pipeline import pipeline_flow

    def not_here(*args, **kwargs):
        raise AssertionError("ran in the pipeline's own process")

    for name in ("cpt", "sft", "evaluate"):
        monkeypatch.setitem(pipeline_config.STAGE_BY_NAME, name, replace(pipeline_config.STAGE_BY_NAME[name], run=not_here))
    execution = {"cpt": "subprocess", "sft": "subprocess", "evaluate": "subprocess"}
    outcome = pipeline_flow(str(write_config(tmp_path, inputs, str(tmp_path / "store"), execution=execution)), run="sp")
    assert outcome["ran"] == ["download", "snr_scan", "layer_select", "cpt", "sft", "evaluate"]
    assert any(line.startswith("[cpt] trained ") for line in outcome["lines"])
    store = open_store(str(tmp_path / "store"))
    assert {"cpt", "sft", "evaluate", "evaluate.sft"} <= set(list_runs(store)["sp"])  # --step sft reached the child


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": {"finetune": {}}}, r"stages.finetune: not a stage; the stages are download, snr_scan"),
        ({"model": None}, r"model: missing; name the base model"),
        ({"stages": {"layer_select": {"top_percent": 150}}}, r"stages.layer_select: --top-percent must be in \(0, 100\]"),
        ({"stages": {"cpt": {"max_step": 3}}}, r"stages.cpt.max_step: not an option of cpt \(did you mean max_steps\?\)"),
        ({"modle": "x"}, r"modle: not a pipeline setting \(did you mean model\?\)"),
        ({"stages": {"cpt": {"selection_run": "r"}}}, r"stages.cpt.selection_run: set by the pipeline"),
        ({"stages": {"cpt": {"max_steps": "many"}}}, r"stages.cpt.max_steps: expected int, found 'many'"),
        ({"stages": {"sft": {"max_steps": 2}}}, r"stages.sft.data: missing"),
        ({"stages": {"cpt": {"zero_stage": 5}}}, r"stages.cpt: unknown --zero-stage 5"),
        ({"report": "yes"}, r"report: expected true or false"),
        ({"execution": "docker"}, r"execution.download: 'docker' is not one of in-process, subprocess"),
        ({"execution": {"cpt": "subprocess", "trian": "subprocess"}}, r"execution.trian: not a stage"),
    ],
)
def test_bad_pipeline_configs_name_the_field(tmp_path, change, message):
    document = {"model": "m", "data": "d", "stages": {"cpt": {"max_steps": 3}}}
    for key, value in change.items():
        if key == "stages":
            document["stages"] = {**document["stages"], **value}
        elif value is None:
            document.pop(key)
        else:
            document[key] = value
    with pytest.raises(InputError, match=message):
        parse_pipeline_config(document, tmp_path / "pipeline.yaml")


def test_a_config_file_that_is_missing_or_not_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_pipeline_config(tmp_path / "nowhere.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(InputError, match="is not valid YAML"):
        load_pipeline_config(tmp_path / "bad.yaml")


def test_reruns_name_a_stage_of_the_pipeline_and_a_committed_run(tmp_path, inputs):
    from flows.pipeline import run_pipeline

    config = load_pipeline_config(write_config(tmp_path, inputs, str(tmp_path / "store")))
    with pytest.raises(InputError, match="--only re-runs a stage of a committed run: name it with --run RUN"):
        run_pipeline(config, only="evaluate")
    with pytest.raises(InputError, match="--from report: not a stage of this pipeline"):
        run_pipeline(config, from_stage="report", run="r")
    with pytest.raises(InputError, match="run r has no committed download stage to build on"):
        run_pipeline(config, only="evaluate", run="r")
