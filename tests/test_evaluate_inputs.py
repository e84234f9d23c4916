"""evaluate refuses what it cannot compare or measure, and keeps datasets apart (issue 14: items 2, 3, 15)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages import evaluate
from stages.base.contracts import EVALUATION_TABLE
from stages.base.errors import CorruptWeightsError, InputError
from stages.core.stage import StageContext
from stages.evaluation.corpus import python_docs
from stages.evaluation.perplexity import Likelihood
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, open_store, read_table

from .helpers import TINY

FAST = dict(snr_drift=False, seq_len=32, max_tokens=256, batch_size=4)


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    return domain_corpus(60, seed=3), python_docs().texts[:80]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, texts) -> Path:
    folder = write_synthetic_model(tmp_path_factory.mktemp("evalin") / "model", SyntheticSpec(**TINY))
    return write_tokenizer(folder, texts[0] + texts[1], TINY["vocab_size"])


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_texts(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def context(tmp_path: Path) -> StageContext:
    return StageContext(open_store(str(tmp_path / "store")), work_dir=tmp_path / "work", progress=False)


def test_a_base_with_another_vocabulary_is_refused_before_any_work(tiny, texts, tmp_path):
    other = copy_model(tiny, tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    write_tokenizer(other, texts[0], TINY["vocab_size"])  # trained on the domain only: other merges, same size
    data = write_texts(tmp_path / "d" / "test.jsonl", texts[0][:20])
    config = evaluate.EvaluateConfig(model=str(tiny), base_model=str(other), data=str(data), **FAST)
    with pytest.raises(InputError, match=r"different tokenizers \(their vocabularies differ in [\d,]+ tokens, e\.g\. .*\): .*--base-model"):
        evaluate.run(config, context(tmp_path))
    assert not list_runs(open_store(str(tmp_path / "store")))  # refused before the stage started: nothing recorded


def test_a_base_with_the_same_vocabulary_that_tokenizes_differently_is_refused(tiny, texts, tmp_path):
    from tokenizers import Tokenizer, normalizers

    other = copy_model(tiny, tmp_path / "other")
    tokenizer = Tokenizer.from_file(str(other / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, other token ids for any capital letter
    tokenizer.save(str(other / "tokenizer.json"))
    general = write_texts(tmp_path / "g" / "docs.jsonl", ["The Python Language Reference. " * 4])
    config = evaluate.EvaluateConfig(model=str(tiny), base_model=str(other), general=str(general), **FAST)
    with pytest.raises(InputError, match=r"different tokenizers \(they tokenize general:docs\.jsonl differently from token \d+ on\)"):
        evaluate.run(config, context(tmp_path))


def test_a_base_whose_tokenizer_files_differ_but_tokenize_alike_is_compared(tiny, texts, tmp_path):
    other = copy_model(tiny, tmp_path / "other")
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 4096}, indent=4))  # other bytes
    data = write_texts(tmp_path / "d" / "test.jsonl", texts[0][:20])
    result = evaluate.run(evaluate.EvaluateConfig(model=str(tiny), base_model=str(other), data=str(data), **FAST), context(tmp_path))
    deltas = [r for r in result.detail.rows if r["model"] == "delta" and r["metric"] == "perplexity"]
    assert {r["dataset"] for r in deltas} == {"domain:test.jsonl", "python-docs"}
    assert all(r["value"] == 0 for r in deltas)  # the same weights, the same tokens: no change


def test_datasets_with_the_same_file_name_are_two_datasets(tiny, texts, tmp_path):
    data = write_texts(tmp_path / "d" / "test.jsonl", texts[0][:20])
    general = write_texts(tmp_path / "g" / "test.jsonl", texts[1][:40])
    base = copy_model(tiny, tmp_path / "base")
    config = evaluate.EvaluateConfig(model=str(tiny), base_model=str(base), data=str(data), general=str(general), **FAST)
    result = evaluate.run(config, StageContext(open_store(str(tmp_path / "store")), run_id="ev", progress=False))

    rows = read_table(open_store(str(tmp_path / "store")), EVALUATION_TABLE, run_id="ev").to_pylist()
    perplexity = {(r["model"], r["dataset"]): r for r in rows if r["metric"] == "perplexity"}
    assert set(perplexity) == {(m, d) for m in ("base", "trained", "delta") for d in ("domain:test.jsonl", "general:test.jsonl")}
    assert perplexity[("trained", "domain:test.jsonl")]["role"] == "domain"
    assert perplexity[("trained", "general:test.jsonl")]["role"] == "general"
    assert perplexity[("trained", "domain:test.jsonl")]["value"] != perplexity[("trained", "general:test.jsonl")]["value"]
    assert perplexity[("delta", "domain:test.jsonl")]["value"] == 0  # each delta within its own corpus
    sha = {r["dataset"]: r["dataset_sha256"] for r in rows}
    assert len({sha["domain:test.jsonl"], sha["general:test.jsonl"]}) == 2
    datasets = result.detail.summary["datasets"]
    assert {name: d["role"] for name, d in datasets.items()} == {"domain:test.jsonl": "domain", "general:test.jsonl": "general"}
    assert datasets["domain:test.jsonl"]["source"] == str(data) and datasets["general:test.jsonl"]["source"] == str(general)
    assert len(result.detail.summary["metrics"]) == 4  # perplexity and nll, per dataset


def with_tensor(source: Path, target: Path, name: str, change) -> Path:
    copy_model(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_diverged_model_is_refused_with_a_clear_error_not_a_traceback(tiny, tmp_path):
    """--no-snr-drift on NaN weights used to end in a JSON ValueError traceback after a NaN perplexity."""
    name = "model.layers.1.mlp.down_proj.weight"
    diverged = with_tensor(tiny, tmp_path / "nan", name, lambda t: torch.full_like(t, float("nan")))
    config = evaluate.EvaluateConfig(model=str(diverged), base_model=str(tiny), **FAST)
    with pytest.raises(CorruptWeightsError, match=rf"the trained model .* has NaN or Inf values in {name}: it diverged"):
        evaluate.run(config, context(tmp_path))


def test_finite_weights_whose_loss_overflows_are_refused(tiny, tmp_path):
    huge = with_tensor(tiny, tmp_path / "huge", "lm_head.weight", lambda t: t * 1e30)  # finite bf16, logits overflow float32
    config = evaluate.EvaluateConfig(model=str(huge), base_model=str(tiny), **FAST)
    with pytest.raises(CorruptWeightsError, match=r"the trained model's loss on python-docs is not finite"):
        evaluate.run(config, context(tmp_path))


def test_perplexity_of_a_huge_loss_is_infinite_not_an_overflow_error():
    assert Likelihood(nll=1e6, tokens=1).perplexity == math.inf
    assert math.isclose(Likelihood(nll=2.0, tokens=2).perplexity, math.e)


def test_the_summary_json_has_no_nan(tmp_path):
    document = evaluate._json({"metrics": [{"value": float("nan"), "relative_change": float("inf")}]})
    assert json.loads(document) == {"metrics": [{"value": None, "relative_change": None}]}
    assert evaluate._report({"metrics": [{"metric": "lm_eval:acc", "dataset": "t", "base": None, "trained": None, "tokens": 3}]}) == [
        "lm_eval:acc on t: not computed over 3 tokens"
    ]


def test_lm_eval_scores_under_two_filters_are_two_metrics():
    from stages.evaluation.harness import score_rows

    results = {
        "results": {
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5, "exact_match_stderr,strict-match": 0.1},
            "hellaswag": {"acc,none": 0.4, "alias": "hellaswag"},
        },
        "n-samples": {"gsm8k": {"effective": 8}, "hellaswag": {"effective": 4}},
    }
    assert [(r["metric"], r["dataset"], r["value"]) for r in score_rows(results)] == [
        ("lm_eval:exact_match/flexible-extract", "gsm8k", 0.5),
        ("lm_eval:exact_match/strict-match", "gsm8k", 0.25),
        ("lm_eval:acc", "hellaswag", 0.4),
    ]
