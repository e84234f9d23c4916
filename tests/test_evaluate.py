"""evaluate: the perplexity convention checked independently, forgetting, SNR drift, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stages import cpt, evaluate
from stages.base.contracts import EVALUATION_TABLE, SNR_DRIFT_TABLE, TRAINED_TENSORS_TABLE
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.evaluation.corpus import python_docs
from stages.evaluation.perplexity import likelihood, token_stream
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, open_store, read_table

from .helpers import TINY

SELECTION = "unfrozen_parameters:\n- model.layers.1.mlp\n- model.layers.1.self_attn.o_proj\n"


@pytest.fixture(scope="module")
def corpora() -> tuple[list[str], list[str]]:
    """The domain (plant logs) and a general corpus that has nothing to do with it (Python's documentation)."""
    return domain_corpus(200, seed=1), python_docs().texts[:300]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpora) -> Path:
    folder = write_synthetic_model(tmp_path_factory.mktemp("eval") / "model", SyntheticSpec(**TINY))
    return write_tokenizer(folder, corpora[0] + corpora[1], TINY["vocab_size"])


def write_texts(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_perplexity_is_exp_of_the_mean_nll_of_every_predicted_token(tiny, corpora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    ids = token_stream(corpora[0][:40], tokenizer, max_tokens=10_000)
    measured = likelihood(model, ids, seq_len=48, batch_size=3, what="logs", progress=False)

    # independently: one window at a time, float64 log-softmax, the log-probability of each next token
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 48):
            window = torch.tensor(ids[start : start + 48])
            if len(window) < 2:
                continue
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            total -= float(log_probs[torch.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
    assert measured.tokens == count
    assert math.isclose(measured.perplexity, math.exp(total / count), rel_tol=1e-5)
    assert ids.count(tokenizer.eos_token_id) == 40  # every document ends with EOS


@pytest.mark.integration
def test_training_on_a_shifted_corpus_lowers_domain_perplexity_and_shows_forgetting(tiny, corpora, tmp_path, monkeypatch):
    """A base that knows the general corpus, trained on the domain: domain perplexity falls, general rises."""
    domain, general = corpora
    store = open_store(str(tmp_path / "store"))
    quiet = {"work_dir": tmp_path / "work", "progress": False}
    common = dict(seq_len=64, micro_batch_size=4, learning_rate=3e-3, warmup_steps=2, save_steps=0)
    pre = cpt.run(
        cpt.CptConfig(model=str(tiny), data=str(write_texts(tmp_path / "general" / "docs.jsonl", general).parent), full=True,
                      max_steps=40, heldout_percent=0, **common),
        StageContext(store, run_id="pretrain", **quiet),
    )  # fmt: skip
    selection = tmp_path / "sel.yaml"
    selection.write_text(SELECTION)
    cpt.run(
        cpt.CptConfig(model=f"store:runs/{pre.run_id}/cpt/model", data=str(write_texts(tmp_path / "logs" / "logs.jsonl", domain).parent),
                      selection=str(selection), max_steps=40, heldout_percent=20, **common),
        StageContext(store, run_id="tuned", **quiet),
    )  # fmt: skip
    general_file = write_texts(tmp_path / "probe" / "general.jsonl", general[:120])
    config = evaluate.EvaluateConfig(cpt_run="tuned", general=str(general_file), seq_len=64, max_tokens=4096, out_dir=str(tmp_path / "out"))
    result = evaluate.run(config, StageContext(store, run_id="eval", **quiet))

    values = {(r["model"], r["metric"], r["dataset"]): r["value"] for r in result.detail.rows}
    assert values[("trained", "perplexity", "heldout")] < 0.9 * values[("base", "perplexity", "heldout")]
    general = "general:general.jsonl"  # the --general file's role and name
    assert values[("trained", "perplexity", general)] > values[("base", "perplexity", general)]  # forgetting
    delta = values[("delta", "perplexity", general)]
    assert math.isclose(delta, values[("trained", "perplexity", general)] - values[("base", "perplexity", general)])
    table = read_table(store, EVALUATION_TABLE, run_id="eval").to_pylist()
    assert {(r["model"], r["metric"], r["dataset"]) for r in table} == set(values)
    assert all(r["tokens"] > 0 for r in table)

    # SNR drift: exactly the trained tensors moved; every frozen one scanned to the identical SNR
    drift = read_table(store, SNR_DRIFT_TABLE, run_id="eval").to_pylist()
    trained = {r["tensor_name"] for r in read_table(store, TRAINED_TENSORS_TABLE, run_id="tuned").to_pylist() if r["changed"]}
    assert {r["tensor_name"] for r in drift if r["changed"]} == trained
    assert all(r["snr_change"] == 0 for r in drift if not r["changed"])
    assert any(r["snr_change"] != 0 for r in drift if r["changed"])
    assert {"snr_scan.evaluate_base", "snr_scan.evaluate", "evaluate"} <= set(list_runs(store)["eval"])

    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["base_model"] == f"store:runs/{pre.run_id}/cpt/model"
    split = json.loads((tmp_path / "store/runs/tuned/cpt/heldout.json").read_text())
    assert summary["datasets"]["heldout"]["documents"] == len(split["text_sha256"]) > 0

    def no_tokenizer_needed(folder):
        raise AssertionError(f"a reused evaluation loaded the tokenizer of {folder}")

    monkeypatch.setattr(evaluate, "load_tokenizer", no_tokenizer_needed)
    again = evaluate.run(config.__class__(**{**config.__dict__, "overwrite": True}), StageContext(store, **quiet))
    assert again.cached and again.run_id == "eval"  # same model and data: the same numbers, reused, nothing tokenized


def test_bad_evaluation_inputs_are_clear_errors(tiny, tmp_path):
    store = open_store(str(tmp_path / "store"))
    context = StageContext(store, progress=False)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "tokenizer.json").write_text((tiny / "tokenizer.json").read_text())
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    (no_tokenizer / "config.json").write_text((tiny / "config.json").read_text())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (dict(model=str(no_weights)), "has no weights"),
        (dict(model=str(no_tokenizer)), "has no tokenizer"),
        (dict(model=str(tiny), data=str(empty)), "holds no documents: the evaluation set is empty"),
        (dict(model=str(tiny), data=str(tmp_path / "nowhere.jsonl")), "does not exist"),
        (dict(cpt_run="no-such-run"), "has no committed manifest for stage 'cpt'"),
        (dict(cpt_run="a", sft_run="b"), "not both"),
        (dict(), "nothing to evaluate"),
        (dict(model=str(tiny), seq_len=1), "--seq-len is too small"),
    ]
    for options, message in cases:
        with pytest.raises(InputError, match=message):
            evaluate.run(evaluate.EvaluateConfig(**options), context)
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.integration
def test_a_run_without_a_held_out_split_needs_data(tiny, corpora, tmp_path):
    store = open_store(str(tmp_path / "store"))
    context = StageContext(store, work_dir=tmp_path / "work", progress=False)
    drop = write_texts(tmp_path / "drop" / "logs.jsonl", corpora[0]).parent
    trained = cpt.run(
        cpt.CptConfig(model=str(tiny), data=str(drop), full=True, max_steps=2, seq_len=64, heldout_percent=0, save_steps=0), context
    )
    with pytest.raises(InputError, match="held-out split of run .* is empty .*pass --data"):
        evaluate.run(evaluate.EvaluateConfig(cpt_run=trained.run_id), context)


def write_task(folder: Path, data: Path) -> Path:
    """A multiple-choice lm-evaluation-harness task read from a local JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plant_mc.yaml").write_text(
        "task: plant_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.mark.integration
def test_lm_evaluation_harness_tasks_run_offline_from_a_local_folder(tiny, tmp_path):
    data = tmp_path / "questions.jsonl"
    rows = [{"question": f"the pump {v}", "choices": [" nominal pressure.", " banana bread."], "label": 0} for v in ("reports", "holds")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    tasks = write_task(tmp_path / "tasks", data)
    store = open_store(str(tmp_path / "store"))
    config = evaluate.EvaluateConfig(model=str(tiny), tasks=["plant_mc"], tasks_dir=str(tasks), snr_drift=False, max_tokens=256)
    result = evaluate.run(config, StageContext(store, work_dir=tmp_path / "work", progress=False))
    (accuracy,) = [r for r in result.detail.rows if r["metric"] == "lm_eval:acc"]
    assert accuracy["dataset"] == "plant_mc" and 0 <= accuracy["value"] <= 1 and accuracy["tokens"] == 6

    with pytest.raises(InputError, match=r"plant_qa are not defined in .*\(it defines: plant_mc\)"):
        evaluate.run(evaluate.EvaluateConfig(model=str(tiny), tasks=["plant_qa"], tasks_dir=str(tasks)), StageContext(store))
    broken = write_task(tmp_path / "broken", tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="could not run plant_mc offline"):
        evaluate.run(
            evaluate.EvaluateConfig(model=str(tiny), tasks=["plant_mc"], tasks_dir=str(broken), snr_drift=False, max_tokens=256),
            StageContext(store, work_dir=tmp_path / "work", progress=False),
        )


def test_a_model_measured_before_on_the_same_tokens_is_not_measured_again(tiny, corpora, tmp_path, monkeypatch):
    """A model line's next base is its last trained model: its numbers are reused (bit-equal), the model not even loaded."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from stages.store import load_manifest

    tuned = Path(shutil.copytree(tiny, tmp_path / "tuned"))
    weights = next(tuned.glob("*.safetensors"))
    state = load_file(weights)
    name = next(n for n in state if n.endswith("mlp.down_proj.weight"))
    state[name] = state[name] * 1.5
    save_file(state, weights, metadata={"format": "pt"})
    store = open_store(str(tmp_path / "store"))
    data = write_texts(tmp_path / "data" / "logs.jsonl", corpora[0][:40])
    settings = {"data": str(data), "seq_len": 32, "max_tokens": 512, "snr_drift": False}
    first_config = evaluate.EvaluateConfig(model=str(tuned), base_model=str(tiny), **settings)
    first = evaluate.run(first_config, StageContext(store, run_id="g1", progress=False))

    loads = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    swapped = evaluate.EvaluateConfig(model=str(tiny), base_model=str(tuned), **settings)
    second = evaluate.run(swapped, StageContext(store, run_id="g2", progress=False))
    assert not second.cached and loads == []  # a new evaluation (other roles), but every number was measured before
    value = {(r["model"], r["metric"], r["dataset"]): r["value"] for r in first.detail.rows}
    again = {(r["model"], r["metric"], r["dataset"]): r["value"] for r in second.detail.rows}
    roles = {"base": "trained", "trained": "base"}
    assert {k: v for k, v in again.items() if k[0] != "delta"} == {(roles[k[0]], *k[1:]): v for k, v in value.items() if k[0] != "delta"}
    steps = set(list_runs(store)["g2"])
    assert {"evaluate.measure_base_domain-logs-jsonl", "evaluate.measure_trained_python-docs"} <= steps
    assert load_manifest(store, "g2", "evaluate.measure_base_domain-logs-jsonl").run_id == "g1"  # a reuse record: the work is g1's

    other_seq_len = evaluate.EvaluateConfig(model=str(tiny), base_model=str(tuned), **{**settings, "seq_len": 16})
    evaluate.run(other_seq_len, StageContext(store, run_id="g3", progress=False))
    assert len(loads) == 2  # another window length is another measurement of both models
