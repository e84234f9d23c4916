"""cpt: real DeepSpeed training on the CPU of a tiny Llama with a locally trained tokenizer."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectrum_cli.main import main
from stages import cpt, layer_select
from stages.base.contracts import CPT, TRAINED_TENSORS_TABLE
from stages.base.errors import InputError
from stages.core.stage import StageContext
from stages.sample_models.synthetic_model import SyntheticSpec, write_synthetic_model
from stages.sample_models.tokenizer import domain_corpus, write_tokenizer
from stages.store import list_runs, load_manifest, open_store, read_table
from stages.store.lineage import audit_run
from stages.store.trees import local_copy
from stages.training import loop

from .helpers import TINY

SELECTION_YAML = "unfrozen_parameters:\n- ^lm_head.weight$\n- model.layers.1.mlp\n- model.layers.1.self_attn.q_proj\n"
TRAINABLE = {
    "lm_head.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return domain_corpus(240)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, corpus) -> Path:
    """A 2-layer bf16 Llama with a 512-token BPE tokenizer trained on the corpus."""
    folder = write_synthetic_model(tmp_path_factory.mktemp("base") / "model", SyntheticSpec(**TINY))
    return write_tokenizer(folder, corpus, TINY["vocab_size"])


@pytest.fixture(scope="module")
def drop(tmp_path_factory, corpus) -> Path:
    folder = tmp_path_factory.mktemp("drop")
    (folder / "part-1.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus[:160]))
    (folder / "part-2.txt").write_text("\n".join(corpus[160:]) + "\n")
    return folder


@pytest.fixture
def selection(tmp_path) -> Path:
    path = tmp_path / "unfrozen_parameters.yaml"
    path.write_text(SELECTION_YAML)
    return path


def config(base_model: Path, drop: Path, **overrides) -> cpt.CptConfig:
    options = dict(model=str(base_model), data=str(drop), max_steps=8, seq_len=64, micro_batch_size=2, gradient_accumulation_steps=2)
    options.update(learning_rate=2e-3, warmup_steps=1, save_steps=4)
    return cpt.CptConfig(**{**options, **overrides})


def context(store_dir: Path, work: Path, **overrides) -> StageContext:
    return StageContext(open_store(str(store_dir)), work_dir=work, progress=False, **overrides)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- training proper ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_selective_training_changes_exactly_the_selected_tensors(base_model, drop, selection, tmp_path, zero_stage):
    result = cpt.run(
        config(base_model, drop, selection=str(selection), zero_stage=zero_stage), context(tmp_path / "store", tmp_path / "work")
    )
    detail = result.detail
    losses = [row["loss"] for row in detail.metrics]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert set(detail.freeze.trainable) == TRAINABLE

    # proof from the files themselves, not from our table
    run_dir = tmp_path / "store" / "runs" / result.run_id / CPT / "model"
    before, after = load_file(str(base_model / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        if name in TRAINABLE:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert (run_dir / "tokenizer.json").is_file()

    table = read_table(result and open_store(str(tmp_path / "store")), TRAINED_TENSORS_TABLE, run_id=result.run_id).to_pylist()
    assert {r["tensor_name"] for r in table if r["changed"]} == TRAINABLE
    assert all(r["relative_change"] > 0 for r in table if r["trainable"])
    assert all(r["sha256_before"] == r["sha256_after"] for r in table if not r["trainable"])
    report = audit_run(open_store(str(tmp_path / "store")), result.run_id)
    assert {r["tensor_name"] for r in report["training"]["changed"]} == TRAINABLE
    manifest = result.manifest
    assert manifest.parameters["deepspeed_config"]["zero_optimization"]["stage"] == zero_stage
    assert manifest.parameters["deepspeed_config"]["optimizer"]["params"]["torch_adam"] is True

    # the held-out documents themselves, for the evaluate stage: the texts whose sha256 heldout.json lists
    split = json.loads((run_dir.parent / "heldout.json").read_text())
    texts = [json.loads(line)["text"] for line in (run_dir.parent / "heldout.jsonl").read_text().splitlines()]
    assert split["documents"] == len(texts) > 0
    assert [hashlib.sha256(t.encode()).hexdigest() for t in texts] == split["text_sha256"]

    # the trained model, brought back verified from the run's recorded outputs (as evaluate and sft read it)
    store = open_store(str(tmp_path / "store"))
    folder, refs = local_copy(f"store:runs/{result.run_id}/{CPT}/model", store)
    assert sha(folder / "model.safetensors") == sha(run_dir / "model.safetensors")
    assert refs["model.safetensors"]["uri"] == store.uri(f"runs/{result.run_id}/{CPT}/model/model.safetensors")


@pytest.mark.integration
@pytest.mark.parametrize("where", ["same-machine", "new-machine"])
def test_a_killed_run_resumes_from_its_checkpoint_to_bit_identical_weights(base_model, drop, selection, tmp_path, monkeypatch, where):
    """same-machine: from the local work folder; new-machine: the work folder is gone, the checkpoint comes from the store."""
    options = config(base_model, drop, selection=str(selection))
    reference = cpt.run(options, context(tmp_path / "reference", tmp_path / "work-reference"))

    real_batch = loop._batch_rows

    def killed_at_step_6(count, settings, step, micro):
        if step == 5:
            raise KeyboardInterrupt
        return real_batch(count, settings, step, micro)

    monkeypatch.setattr(loop, "_batch_rows", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        cpt.run(options, context(tmp_path / "store", tmp_path / "work"))
    monkeypatch.setattr(loop, "_batch_rows", real_batch)
    (failed,) = list_runs(open_store(str(tmp_path / "store")))
    assert (tmp_path / "store" / "runs" / failed / CPT / "checkpoints" / "step-4" / "complete.json").is_file()
    if where == "new-machine":
        shutil.rmtree(tmp_path / "work")
    resumed = cpt.run(options, context(tmp_path / "store", tmp_path / "work"))
    assert resumed.detail.resumed_from_step == 4 and len(resumed.detail.metrics) == 4
    training = json.loads((tmp_path / "store" / "runs" / resumed.run_id / CPT / "training.json").read_text())
    assert training["restored_from"] == ({"run_id": failed, "step": 4} if where == "new-machine" else None)
    weights = "model/model.safetensors"
    assert sha(tmp_path / "store" / "runs" / resumed.run_id / CPT / weights) == sha(
        tmp_path / "reference" / "runs" / reference.run_id / CPT / weights
    )
    assert [round(r["loss"], 6) for r in resumed.detail.metrics] == [round(r["loss"], 6) for r in reference.detail.metrics[4:]]
    assert cpt.run(options, context(tmp_path / "store", tmp_path / "work")).cached


@pytest.mark.integration
def test_selection_from_a_layer_select_run_and_full_training(base_model, drop, tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert main(["scan", str(base_model), "--store", str(store_dir), "--no-progress", "--workers", "1"]) == 0
    scan_run = capsys.readouterr().out.split("committed run ")[1].split()[0]
    selected = layer_select.run(layer_select.SelectConfig(snr_run=scan_run, top_percent=25), StageContext(open_store(str(store_dir))))
    trained = cpt.run(config(base_model, drop, selection_run=selected.run_id, max_steps=2), context(store_dir, tmp_path / "w1"))
    assert set(trained.detail.freeze.trainable) == set(selected.detail.summary["trainable_tensors"])
    full = cpt.run(config(base_model, drop, full=True, max_steps=2, gradient_checkpointing=True), context(store_dir, tmp_path / "w2"))
    assert full.detail.freeze.trainable_parameters == full.detail.freeze.total_parameters


# --- bad input ------------------------------------------------------------------------------------


def bad(base_model, drop, tmp_path, message, **overrides):
    with pytest.raises(InputError, match=message):
        cpt.run(config(base_model, drop, **overrides), context(tmp_path / "store", tmp_path / "work"))
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


@pytest.mark.integration
def test_no_warm_up_starts_at_the_full_learning_rate(base_model, drop, selection, tmp_path):
    """DeepSpeed's scheduler refuses 0 warm-up steps; ours means the first step already uses the peak rate."""
    result = cpt.run(
        config(base_model, drop, selection=str(selection), warmup_steps=0, max_steps=3, save_steps=0),
        context(tmp_path / "store", tmp_path / "work"),
    )
    rates = [row["learning_rate"] for row in result.detail.metrics]
    assert rates[0] == pytest.approx(2e-3) and rates[0] > rates[-1]


def test_bad_training_options_are_refused_before_any_work(base_model, drop, selection, tmp_path):
    bad(base_model, drop, tmp_path, "unknown --zero-stage 5", selection=str(selection), zero_stage=5)
    bad(base_model, drop, tmp_path, "pass --selection FILE or --selection-run RUN")
    bad(base_model, drop, tmp_path, "--full trains everything", selection=str(selection), full=True)
    bad(base_model, drop, tmp_path, "--offload-params needs --zero-stage 3", selection=str(selection), offload_params=True)
    bad(base_model, drop, tmp_path, "--max-steps must be at least 1", selection=str(selection), max_steps=0)
    bad(base_model, drop, tmp_path, "no data", selection=str(selection), data=None)
    zero_offload = {"offload_optimizer": True, "zero_stage": 0}
    bad(base_model, drop, tmp_path, "--offload-optimizer needs --zero-stage 1, 2 or 3", selection=str(selection), **zero_offload)
    bad(base_model, drop, tmp_path, r"--heldout-percent must be in \[0, 100\)", selection=str(selection), heldout_percent=100.0)
    bad(base_model, drop, tmp_path, "--learning-rate must be positive", selection=str(selection), learning_rate=0.0)
    bad(base_model, drop, tmp_path, "--lora-rank must be 0", lora_rank=-1)
    bad(base_model, drop, tmp_path, "--lora-rank is supported with --zero-stage 0, 1 or 2", lora_rank=4, zero_stage=3)


@pytest.mark.integration
def test_bad_data_and_models_are_clear_errors(base_model, corpus, selection, tmp_path):
    def drop_with(name: str, text: str) -> Path:
        folder = tmp_path / f"drop-{name}"
        folder.mkdir()
        (folder / name).write_text(text)
        return folder

    bad(
        base_model,
        drop_with("a.jsonl", '{"text": "fine"}\n{not json\n'),
        tmp_path,
        r"a.jsonl, line 2 is not JSON",
        selection=str(selection),
    )
    bad(
        base_model,
        drop_with("b.jsonl", '{"body": "x"}\n'),
        tmp_path,
        r"b.jsonl, line 1 has no 'text' text field \(it has: body\)",
        selection=str(selection),
    )
    bad(base_model, drop_with("c.txt", "\n\n"), tmp_path, "is empty: it holds no documents", selection=str(selection))
    bad(base_model, drop_with("d.txt", "too short\n"), tmp_path, "fewer than one sequence of --seq-len 64", selection=str(selection))
    other = tmp_path / "other-model.json"
    other.write_text(json.dumps({"trainable_tensors": ["lm_head.weight"], "model_id": "other", "model_structure": "0" * 64}))
    bad(base_model, drop_with("f.txt", "\n".join(corpus) + "\n"), tmp_path, "was made for another model", selection=str(other))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"trainable_tensors": ["model.layers.9.mlp.up_proj.weight"]}))
    drop = drop_with("e.txt", "\n".join(corpus) + "\n")
    bad(base_model, drop, tmp_path, "names 1 tensor.* this model does not have .*model.layers.9", selection=str(names))
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("unfrozen_parameters:\n- ^vision_tower\\.\n")
    bad(base_model, drop, tmp_path, "nothing would be trained", selection=str(nothing))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((base_model / name).read_bytes())
    bad(bare, drop, tmp_path, "has no tokenizer", selection=str(selection))
    small = tmp_path / "small-vocabulary"
    shutil.copytree(base_model, small)
    document = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**document, "vocab_size": 256}))  # the tokenizer outgrows it
    bad(small, drop, tmp_path, r"has \d+ tokens but the model's embedding has 256 rows", selection=str(selection))


@pytest.mark.integration
def test_a_run_that_would_not_fit_in_memory_is_refused_with_the_estimate(base_model, drop, selection, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "available_memory", lambda: 1024 * 1024)
    bad(base_model, drop, tmp_path, r"needs about .* GiB but this machine has 0.0 GiB", selection=str(selection))


# --- backward stops at the lowest trainable tensor ---------------------------------------------------


def test_checkpointing_does_not_push_backward_through_frozen_layers(tmp_path):
    """transformers' input-grad hook (installed with checkpointing) makes backward run through every layer."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.training.freezing import apply_selection, enable_checkpointing
    from stages.training.selection import Selection

    def backward_flops(ours: bool) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, vocab_size=128)
        )
        apply_selection(model, Selection((r"model\.layers\.5\.",), "upper layer", {}))
        if ours:
            enable_checkpointing(model)
        else:
            model.gradient_checkpointing_enable()  # transformers' default: reentrant, with the input-grad hook
        model.train()
        batch = torch.randint(0, 128, (2, 32))
        loss = model(input_ids=batch, labels=batch).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        return counter.get_total_flops()

    ours, default = backward_flops(True), backward_flops(False)
    assert ours < 0.6 * default, (ours, default)


@pytest.mark.integration
def test_two_ranks_with_torchrun_on_the_cpu_publish_one_run(base_model, drop, selection, tmp_path):
    import os
    import subprocess
    import sys

    from .helpers import REPO_ROOT
    from .s3_server import free_ports

    store_dir = tmp_path / "store"
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "stages.cpt"]
    command += [str(base_model), "--data", str(drop), "--selection", str(selection), "--store", str(store_dir)]
    command += ["--work-dir", str(tmp_path / "work"), "--max-steps", "4", "--seq-len", "64", "--learning-rate", "2e-3"]
    command += ["--warmup-steps", "1", "--save-steps", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = open_store(str(store_dir))
    (run,) = list_runs(store)
    manifest = load_manifest(store, run, CPT)
    assert manifest.status == "succeeded"
    table = read_table(store, TRAINED_TENSORS_TABLE, run_id=run).to_pylist()
    assert {r["tensor_name"] for r in table if r["changed"]} == TRAINABLE
    metrics = read_table(store, "training_metrics", run_id=run).to_pylist()
    assert len(metrics) == 4
    assert "rank 1: trained; rank 0 publishes the run" in done.stdout


def test_tied_embeddings_are_one_trainable_tensor_and_a_yaml_matches_them_as_axolotl_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.training.freezing import apply_selection
    from stages.training.selection import Selection

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = apply_selection(model, Selection((r"^model\.embed_tokens\.weight$",), "yaml", {}))
    assert report.trainable == ("model.embed_tokens.weight",)
    assert model.lm_head.weight.requires_grad and not model.model.layers[0].mlp.up_proj.weight.requires_grad
    # a YAML's `^lm_head.weight$` names no parameter of a tied model (as in Axolotl): matched with another line, it is ignored
    report = apply_selection(model, Selection((r"^lm_head\.weight$", r"model\.layers\.1\.mlp\.up_proj"), "yaml", {}))
    assert report.trainable == ("model.layers.1.mlp.up_proj.weight",) and report.unmatched_patterns == (r"^lm_head\.weight$",)
    assert not model.lm_head.weight.requires_grad
    by_name = Selection((r"^lm_head\.weight$",), "selection.json", {}, exact_names=("lm_head.weight",))  # an exact name: either name
    assert apply_selection(model, by_name).trainable == ("model.embed_tokens.weight",)


@pytest.mark.integration
def test_lora_baseline_trains_adapters_and_merges_them(base_model, drop, tmp_path):
    result = cpt.run(config(base_model, drop, lora_rank=4, max_steps=4, save_steps=0), context(tmp_path / "store", tmp_path / "work"))
    freeze = result.detail.freeze
    assert freeze.trainable_parameters < 0.2 * freeze.total_parameters
    linear = {name for name in freeze.trainable}
    assert "model.layers.0.self_attn.q_proj.weight" in linear and "lm_head.weight" not in linear
    table = read_table(open_store(str(tmp_path / "store")), TRAINED_TENSORS_TABLE, run_id=result.run_id).to_pylist()
    changed = {r["tensor_name"] for r in table if r["changed"]}
    assert changed and changed <= linear
    assert not any(r["changed"] for r in table if "norm" in r["tensor_name"] or "embed" in r["tensor_name"])
    with pytest.raises(InputError, match="--lora-rank trains adapters instead of a selection"):
        cpt.run(config(base_model, drop, lora_rank=4, full=True), context(tmp_path / "store", tmp_path / "work"))


@pytest.mark.integration
def test_one_process_trains_without_compiling_an_op(base_model, drop, selection, tmp_path):
    """A first start in a fresh venv or container: one rank makes no collectives, so nothing is compiled."""
    import os
    import subprocess
    import sys

    from .helpers import REPO_ROOT

    extensions = tmp_path / "torch-extensions"  # empty: an op DeepSpeed built would appear here
    command = [sys.executable, "-m", "stages.cpt", str(base_model), "--data", str(drop), "--selection", str(selection)]
    command += ["--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work"), "--max-steps", "2", "--seq-len", "64"]
    command += ["--save-steps", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(extensions.rglob("*.so")) and "built successfully" not in done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_training_of_a_float32_model_keeps_frozen_tensors_exact_and_saves_the_fp32_weights_it_trained(
    corpus, drop, selection, tmp_path, zero_stage
):
    """bf16 holds the whole model in bf16: frozen tensors are written from the base (checked untouched), trained ones from fp32."""
    base = write_tokenizer(
        write_synthetic_model(tmp_path / "fp32", SyntheticSpec(**{**TINY, "dtype": "float32"})), corpus, TINY["vocab_size"]
    )
    options = dict(selection=str(selection), precision="bf16", zero_stage=zero_stage, max_steps=2, save_steps=0, warmup_steps=0)
    result = cpt.run(config(base, drop, **options), context(tmp_path / "store", tmp_path / "work"))
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "store" / "runs" / result.run_id / CPT / "model" / "model.safetensors"))
    for name, tensor in before.items():
        assert after[name].dtype == torch.float32
        if name in TRAINABLE:
            assert not torch.equal(after[name], tensor), name
            assert not torch.equal(after[name].to(torch.bfloat16).float(), after[name]), name  # fp32 values, not bf16 ones
        else:
            assert torch.equal(after[name], tensor), name


def test_a_frozen_tensor_changed_in_memory_or_in_the_saved_files_is_refused(base_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.training.runner import _save_model
    from stages.training.tensor_audit import FrozenTensorChangedError, audit_tensors

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    name = "model.layers.0.mlp.up_proj.weight"
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    state[name] += 1.0
    with pytest.raises(FrozenTensorChangedError, match=name):  # frozen, yet changed in memory: nothing is saved
        _save_model(model, state, base_model, tmp_path / "out", tokenizer, {"lm_head.weight"})
    assert not (tmp_path / "out").exists()
    _save_model(model, state, base_model, tmp_path / "out", tokenizer, {name})  # saved as trained
    assert audit_tensors(base_model, tmp_path / "out", {name}).num_rows == len(load_file(str(base_model / "model.safetensors")))
    with pytest.raises(FrozenTensorChangedError, match=name):  # the files say it changed: the audit refuses it as frozen
        audit_tensors(base_model, tmp_path / "out", set())


@pytest.mark.integration
@pytest.mark.parametrize("head_stored", [False, True])
def test_a_tied_model_is_saved_with_the_base_s_tensor_names(corpus, drop, tmp_path, head_stored):
    """Tied embeddings: the trained model stores what the base stored (lm_head too only where the base has it), and the audit agrees."""
    from safetensors.torch import save_file

    base = write_tokenizer(
        write_synthetic_model(tmp_path / "tied", SyntheticSpec(**TINY, tie_word_embeddings=True)), corpus, TINY["vocab_size"]
    )
    if head_stored:  # some checkpoints store the tied head as a tensor of its own
        tensors = load_file(str(base / "model.safetensors"))
        save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, str(base / "model.safetensors"))
    result = cpt.run(
        config(base, drop, full=True, max_steps=2, save_steps=0, warmup_steps=0), context(tmp_path / "store", tmp_path / "work")
    )
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "store" / "runs" / result.run_id / CPT / "model" / "model.safetensors"))
    assert sorted(after) == sorted(before)
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
