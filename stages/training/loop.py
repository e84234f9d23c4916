"""The DeepSpeed training loop shared by cpt and sft: config from our options, checkpoints, resume, metrics.

One process by default (the distributed variables are filled in when no launcher set them); with
`deepspeed` or `torchrun` every rank runs the same loop. DeepSpeed picks its accelerator: CUDA
on a GPU node, its CPU accelerator (gloo) elsewhere. The optimizer is a torch AdamW over the
trainable parameters only (`torch_adam`, in every ZeRO and offload mode, so no Adam op is compiled and a
resumed run computes exactly what an uninterrupted one does), with DeepSpeed's warm-up +
cosine schedule and gradient clipping at 1.0.

Batches are a pure function of the step: optimizer step s, micro-batch m reads samples
(s * accumulation + m) * micro_batch … of an endless stream of seeded per-epoch permutations. A
run resumed from a checkpoint therefore sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..base.errors import InputError
from ..base.library_output import deepspeed_start, import_deepspeed
from .chat import IGNORE
from .opbuild import build_ops, skip_ops
from .settings import TrainingArrays, TrainingDivergedError, TrainSettings, deepspeed_config


@dataclass
class TrainOutcome:
    state_dict: dict[str, torch.Tensor]  # full weights after training (gathered under ZeRO-3), on the CPU
    metrics: list[dict[str, Any]]  # one row per optimizer step
    resumed_from_step: int
    steps: int
    seconds: float


def train(
    model: torch.nn.Module,
    data: TrainingArrays,
    settings: TrainSettings,
    checkpoint_dir: Path,
    progress: bool | None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """Train `model` (already frozen as selected) on `data`; resume from `checkpoint_dir` when it holds a checkpoint."""
    deepspeed = import_deepspeed()  # stdout carries the stage's result alone
    init_distributed()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed_start():  # its communication backend prints op builds on stdout
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=deepspeed_config(settings))
    started = time.perf_counter()
    first_step = 0
    if (checkpoint_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(checkpoint_dir))
        first_step = int((client_state or {}).get("step", 0))
    elif scheduler is not None:
        # DeepSpeed's scheduler starts before its first iteration, at rate 0: step 1 would not train at all
        # (with no warm-up, not at the full rate). Step s trains at the rate of iteration s - 1.
        scheduler.step(0)
    metrics = _steps(engine, data, settings, first_step, checkpoint_dir, progress, on_checkpoint)
    require_finite_weights(_trainable_tensors(engine.module), settings.max_steps, settings)
    state = _gather_state_dict(engine, settings.bf16)
    return TrainOutcome(state, metrics, first_step, settings.max_steps, time.perf_counter() - started)


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Once per process: the group is reused by later runs in the same process (DeepSpeed caches it), and
    destroyed at exit (a process that exits with it alive can abort)."""

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def _steps(engine, data, settings, first_step, checkpoint_dir, progress, on_checkpoint) -> list[dict[str, Any]]:
    tokens_per_step = settings.micro_batch_size * settings.gradient_accumulation_steps * data.tokens_per_row
    metrics: list[dict[str, Any]] = []
    engine.train()
    with tqdm(
        total=settings.max_steps, initial=first_step, unit="step", desc="training", disable=(not progress) if progress is not None else None
    ) as bar:
        for step in range(first_step, settings.max_steps):
            started = time.perf_counter()
            rate = float(engine.get_lr()[0])  # the rate this step trains at (the optimizer's, restored on resume)
            batches = [data.batch(_batch_rows(data.rows, settings, step, micro)) for micro in range(settings.gradient_accumulation_steps)]
            counts, weights = _token_weights(batches, data.labels is not None, engine.device)
            losses = []
            for batch, weight in zip(batches, weights, strict=True):
                loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
                _require_finite_loss(float(loss.detach()), step + 1, settings)  # before the update it would make
                engine.backward(loss * weight if weight != 1.0 else loss)
                engine.step()
                losses.append(float(loss.detach()))
            seconds = time.perf_counter() - started
            grad_norm = engine.get_global_grad_norm()
            row = {
                "step": step + 1,
                "loss": float(np.average(losses, weights=counts)),
                "learning_rate": rate,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_second": tokens_per_step / seconds if seconds > 0 else None,
                "step_seconds": seconds,
                "peak_memory_bytes": _peak_memory(),
            }
            metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            bar.update(1)
            done = step + 1
            if settings.save_steps and done % settings.save_steps == 0 and done < settings.max_steps:
                require_finite_weights(_trainable_tensors(engine.module), done, settings)  # no checkpoint of garbage
                with disk_errors(checkpoint_dir):
                    engine.save_checkpoint(str(checkpoint_dir), tag=f"step-{done}", client_state={"step": done})
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()  # every rank's shard is on disk before rank 0 copies the checkpoint
                if on_checkpoint is not None:
                    on_checkpoint(done)
    return metrics


def _token_weights(batches: list[dict[str, torch.Tensor]], masked: bool, device: torch.device) -> tuple[list[int], list[float]]:
    """Each micro-batch's count of predicted tokens, and the factor that makes the step's update their mean over every one.

    The model's loss is a mean over one micro-batch's predicted tokens, and DeepSpeed averages the
    micro-batches (and the ranks) with equal weight: with SFT's masked labels a micro-batch of few
    answer tokens would count more per token. Scaled by count × micro-batches × ranks / all counts,
    the step's gradient is the token mean over the whole step, as one large batch would give.
    """
    counts = [int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in batches]
    if not masked:
        return counts, [1.0] * len(counts)  # packed pre-training rows: every token is predicted, the same count everywhere
    total = torch.tensor(float(sum(counts)), device=device)
    ranks = 1
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        ranks = torch.distributed.get_world_size()
    scale = len(batches) * ranks / float(total)
    return counts, [count * scale for count in counts]


@contextmanager
def disk_errors(folder: Path) -> Iterator[None]:
    """Writers that hide the file system's refusal raise it as the OSError it is (the CLI reports it, exit 5).

    torch.save raises RuntimeError("[enforce fail at inline_container.cc] … unexpected pos …") on a
    full disk, safetensors a SafetensorError("… No space left on device (os error 28)").
    """
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        refused = _os_error_in(exc, folder)
        if refused is None:
            raise
        raise refused from exc


def _os_error_in(exc: BaseException, folder: Path) -> OSError | None:
    cause: BaseException | None = exc
    while cause is not None:  # an OSError wrapped by the writer
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if match := re.search(r"\(os error (\d+)\)", text):
        code = int(match[1])
        return OSError(code, os.strerror(code), str(folder))
    if "inline_container" in text or "PytorchStreamWriter" in text:  # torch's zip writer says only that a write failed
        free = shutil.disk_usage(_existing(folder)).free
        code = errno.ENOSPC if free < _NEARLY_FULL else errno.EIO
        return OSError(code, os.strerror(code), str(folder))
    return None


_NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write is taken for a full disk


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _require_finite_loss(loss: float, step: int, settings: TrainSettings) -> None:
    """Every rank stops at the same step when any rank's loss is non-finite (no rank waits for the others forever)."""
    if _any_rank(not np.isfinite(loss)):
        raise TrainingDivergedError(
            f"training diverged at step {step} of {settings.max_steps}: the loss is non-finite{_diverged_advice(settings)}"
        )


def require_finite_weights(tensors: dict[str, torch.Tensor], step: int, settings: TrainSettings) -> None:
    """Raise naming the first trained tensor that holds NaN or infinity (checked on every rank together)."""
    broken = [name for name, tensor in tensors.items() if tensor.numel() and not bool(torch.isfinite(tensor).all())]
    if _any_rank(bool(broken)):
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        which = f"tensor {broken[0]}{more}" if broken else "a tensor on another rank"
        raise TrainingDivergedError(
            f"training diverged by step {step} of {settings.max_steps}: {which} holds NaN or infinite values"
            f"{_diverged_advice(settings)}"
        )


def _diverged_advice(settings: TrainSettings) -> str:
    return (
        f" (--learning-rate {settings.learning_rate:g}); nothing was committed: lower --learning-rate"
        " or lengthen --warmup-steps, and run again"
    )


def _any_rank(flag: bool) -> bool:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _trainable_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's values of the trained parameters (under ZeRO-3 its partition of each)."""
    return {name: getattr(p, "ds_tensor", p).detach() for name, p in module.named_parameters() if p.requires_grad}


def _batch_rows(count: int, settings: TrainSettings, step: int, micro: int) -> list[int]:
    """The rows of micro-batch `micro` of optimizer step `step` on this rank: a pure function of the step and the seed."""
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if torch.distributed.is_initialized() else (0, 1)
    first = ((step * settings.gradient_accumulation_steps + micro) * world + rank) * settings.micro_batch_size
    rows = []
    for sample in range(first, first + settings.micro_batch_size):
        epoch, position = divmod(sample, count)
        rows.append(int(np.random.default_rng([settings.seed, epoch]).permutation(count)[position]))
    return rows


def _gather_state_dict(engine, bf16: bool) -> dict[str, torch.Tensor]:
    """The module's weights on the CPU; in bf16, each trained one from the optimizer's fp32 copy (what it trained).

    The module holds bf16 copies; saving those would round an fp32 base model's trained tensors to bf16.
    """
    deepspeed = import_deepspeed()

    module = engine.module
    whole = engine.zero_optimization_stage() == 3  # ZeRO-3 partitions the weights themselves: gathered to be read
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if whole else nullcontext():
        state = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param

        masters: dict[int, torch.Tensor | None] = {}
        for name, parameter in module.named_parameters(remove_duplicate=False):  # the same order on every rank (ZeRO-3 gathers)
            if parameter.requires_grad and name in state:
                if id(parameter) not in masters:
                    full = safe_get_full_fp32_param(parameter)
                    masters[id(parameter)] = None if full is None else full.detach().cpu().clone()
                if masters[id(parameter)] is not None:
                    state[name] = masters[id(parameter)]
    return state


def _peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def init_distributed() -> None:
    """The process group, once per process: the launcher's rendezvous under `deepspeed`/`torchrun`, else one rank.

    One process needs no rendezvous: its group is built on an in-memory store, so two runs on one
    machine never race for a TCP port (a port picked free and bound later can be taken in between).
    DeepSpeed adopts an initialised group.
    """
    if torch.distributed.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE") or 1) == 1:
        skip_ops()  # one rank makes no collectives: nothing to compile on a first start
    else:
        build_ops()  # before any rendezvous: a rank waiting for a build holds up no collective
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # DeepSpeed otherwise looks for MPI; the address and port are never used (no rendezvous).
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0")):
            os.environ[name] = value
    if int(os.environ["WORLD_SIZE"]) == 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    else:
        import_deepspeed().init_distributed()
    _destroy_process_group_at_exit()


def same_on_every_rank(value: Any) -> Any:
    """Rank 0's `value`, on every rank of a multi-process launch (one decision, however the ranks timed it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return value
    init_distributed()
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def available_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def require_fits(estimate: int, where: str) -> None:
    """Refuse a run whose planned memory (training.memory_plan) exceeds this device's before anything starts."""
    available = available_memory()
    if estimate > available:
        raise InputError(
            f"{where} needs about {estimate / 2**30:.1f} GiB but this machine has {available / 2**30:.1f} GiB; "
            "lower --micro-batch-size or --seq-len, train fewer tensors, or use --zero-stage 3 with offload"
        )
