"""What a training run is given, without torch: its settings, the DeepSpeed config they describe, its rows of tokens.

The pipeline reads these to plan a training stage and find its committed run (the DeepSpeed
config is part of the cache key), so a pipeline whose training is reused imports no torch;
stages.training.loop, which trains, imports torch and DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base.errors import CorruptWeightsError

if TYPE_CHECKING:
    import torch


class TrainingDivergedError(CorruptWeightsError):
    """The loss or a trained tensor became non-finite: the weights are garbage and nothing is committed."""


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    seed: int
    save_steps: int  # 0: no intermediate checkpoints
    zero_stage: int
    bf16: bool
    offload_optimizer: bool
    offload_params: bool


def deepspeed_config(settings: TrainSettings) -> dict[str, Any]:
    """The DeepSpeed config our options describe (recorded in the manifest as it is used)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            # torch_adam is read from the params: beside them DeepSpeed ignored it and used its FusedAdam, or with
            # --offload-optimizer its CPU Adam, whose bias correction after a resume differs in the last bits.
            "params": {
                "lr": settings.learning_rate,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": settings.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            # DeepSpeed refuses 0 warm-up steps: no warm-up is one step that starts at the full rate.
            "params": {
                "total_num_steps": settings.max_steps,
                "warmup_num_steps": max(settings.warmup_steps, 1),
                "warmup_min_ratio": 0.0 if settings.warmup_steps else 1.0,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.bf16},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class TrainingArrays:
    """Fixed-length training rows: token ids, and for chat data the labels (-100: no loss) and padding mask."""

    input_ids: np.ndarray  # [rows, seq_len]
    labels: np.ndarray | None = None  # None: predict every token (packed pre-training text)
    attention_mask: np.ndarray | None = None  # None: no padding

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch

        ids = torch.from_numpy(np.asarray(self.input_ids[indices]).astype(np.int64))
        batch = {
            "input_ids": ids,
            "labels": ids if self.labels is None else torch.from_numpy(np.asarray(self.labels[indices]).astype(np.int64)),
        }
        if self.attention_mask is not None:
            batch["attention_mask"] = torch.from_numpy(np.asarray(self.attention_mask[indices]).astype(np.int64))
        return batch

    @property
    def tokens_per_row(self) -> int:
        return int(self.input_ids.shape[1])
