"""Build a randomly initialised model checkpoint whose weights have real low-rank structure.

No pretrained causal LM is available offline, so the demo, tests and benchmarks write their own:
the architecture's real tensor names and shapes (from transformers, on the meta device), each
matrix a planted low-rank signal of varying strength plus Gaussian noise, saved as safetensors
shards with an index, exactly as a Hugging Face checkpoint is laid out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class SyntheticSpec:
    architecture: str = "llama"  # any transformers model_type with a causal-LM head, e.g. llama, qwen2
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 2048
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    noise_std: float = 0.02
    seed: int = 0
    max_shard_bytes: int | None = None  # split into shards with an index when set


def write_synthetic_model(out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(
        spec.architecture,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=2048,
    )
    config.dtype = spec.dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parameters = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]
    generator = torch.Generator().manual_seed(spec.seed)
    dtype = DTYPES[spec.dtype]

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, shape in parameters:
        tensor = _structured(shape, spec.noise_std, generator).to(dtype)
        size = tensor.numel() * tensor.element_size()
        if spec.max_shard_bytes and shards[-1] and shard_bytes + size > spec.max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    _save_shards(out, shards)
    config.save_pretrained(out)
    return out


def _structured(shape: tuple[int, ...], noise_std: float, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights near one
        return 1.0 + 0.05 * torch.randn(shape, generator=generator)
    if len(shape) == 3:  # fused MoE experts: a structured matrix per expert
        return torch.stack([_structured(shape[1:], noise_std, generator) for _ in range(shape[0])])
    rows, cols = shape
    rank = int(torch.randint(2, max(3, min(rows, cols) // 8), (1,), generator=generator))
    gain = float(torch.empty(1).uniform_(0.3, 3.0, generator=generator))
    edge = noise_std * (math.sqrt(rows) + math.sqrt(cols))  # top of the noise bulk
    strengths = edge * gain * (1.0 + 4.0 * torch.rand(rank, generator=generator)).sort(descending=True).values
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    return (left * strengths) @ right.T + noise_std * torch.randn(rows, cols, generator=generator)


def _save_shards(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for number, tensors in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
