"""How much memory a training run needs per device, planned before anything runs: the one estimate in the code.

The model is built on the meta device (shapes and dtypes, no weights: a 70B config plans in
seconds) with the trainable set the run would train. Per device, for DeepSpeed ZeRO 0-3 on N
devices, as our runner trains (loop.deepspeed_config: torch AdamW, bf16 on a GPU, fp32 on the CPU):

- weights: every parameter in the training dtype (DeepSpeed casts the fp32 model to bf16), split N
  ways under ZeRO-3 (on the host with --offload-params);
- gradients: the trainable parameters' gradients (ZeRO 0: whole, plus bf16's fp32 accumulators;
  ZeRO 1/2: the rank's fp32 partition; ZeRO-3: its partition in the training dtype and in fp32);
- optimizer: Adam's two fp32 moments and the fp32 master copy of the trainable parameters (no
  master for fp32 at ZeRO 0: torch's AdamW updates the parameters themselves), split N ways at
  ZeRO >= 1, on the host with --offload-optimizer (with the fp32 gradient partition);
- activations: what autograd keeps for backward, traced on the meta device layer by layer with the
  run's requires_grad flags (a frozen prefix below the lowest trainable tensor keeps nothing, as
  freezing.enable_checkpointing arranges), attention as a fused kernel keeps it (no seq_len^2
  scores); with gradient checkpointing each layer backward reaches keeps its input, plus one
  layer recomputed; plus the loss's fp32 logits and their gradient, and the gradients of one
  layer's activations (backward holds them for the layer it is in);
- buffers: DeepSpeed's gradient reduce bucket (reduce_bucket_size, DeepSpeed's default, as our
  config sets none), the fp32 copies its ZeRO step makes of the rank's partition (STEP_COPIES,
  measured on the CPU and on a GPU), at ZeRO 0 the gradients flattened for the all-reduce, and under ZeRO-3 the gathered
  parameters of two layers (the one computing and the one prefetched). On a GPU a bucket is
  allocated whole; on the CPU only the pages written are resident, so there a bucket counts what
  it holds (at most the trainable parameters).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..base.errors import InputError

REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's reduce_bucket_size (our deepspeed_config leaves it at the default)
ALLREDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's allreduce bucket at ZeRO 0 with several ranks
MAX_LIVE_PARAMETERS = 1_000_000_000  # elements: ZeRO-3's stage3_max_live_parameters default
ZERO_STAGES = (0, 1, 2, 3)
# fp32 copies of the rank's trainable partition that DeepSpeed's ZeRO step holds at its peak beyond the gradient
# partition (flattened and converted gradients, their clipped copy, the updated parameters on their way back):
# measured, not derived. On the CPU with benchmarks/plan_vs_measured.py (fp32). On a GPU with
# benchmarks/gpu_acceptance.py (an H200, bf16, 2026-12-04): there the step adds almost nothing at ZeRO-1 and ZeRO-2
# (their peaks on one GPU were the same to 0.4%, the reduce bucket in bf16 at both) and one copy of the stepped
# sub-group at ZeRO-3.
STEP_COPIES = {"cpu": {1: 4, 2: 4, 3: 5}, "cuda": {1: 0, 2: 0, 3: 1}}
SUB_GROUP = 1_000_000_000  # elements: ZeRO-3's sub_group_size default
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Setup:
    """How the run trains: the devices, DeepSpeed's ZeRO stage and offload, the batch and checkpointing."""

    gpus: int = 1
    zero_stage: int = 2
    bf16: bool = True
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    device: str = "cuda"  # "cpu": a bucket counts only the pages written, and the step's copies are the CPU's (module docstring)

    def describe(self) -> str:
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        parts = [f"ZeRO-{self.zero_stage}", f"micro-batch {self.micro_batch_size}", f"seq-len {self.seq_len}"]
        parts.append("gradient checkpointing" if self.gradient_checkpointing else "no checkpointing")
        parts.append(f"offload {' and '.join(offload)} to the host" if offload else "no offload")
        return ", ".join(parts)


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps per sequence (micro-batch 1) at one seq_len, from the meta-device trace."""

    layers: tuple[int, ...]  # saved for backward by each decoder layer (0: backward never reaches it)
    layer_input: int  # one layer's input (what a checkpointed layer keeps)
    head: int  # final norm, lm_head and the loss (fp32 logits) saved for backward
    logits: int  # one fp32 logits tensor: its gradient exists beside the saved ones when backward starts

    def bytes(self, micro_batch: int, checkpointing: bool) -> int:
        reached = [saved for saved in self.layers if saved]
        # checkpointing: each layer backward reaches keeps its input, and one layer is recomputed at a time
        kept = len(reached) * self.layer_input + max(reached, default=0) if checkpointing else sum(reached)
        working = max(reached, default=0)  # the gradients of one layer's activations while its backward runs
        return micro_batch * (kept + working + self.head + self.logits)


@dataclass(frozen=True)
class Trainable:
    """The model's parameters and what a run trains of them (LoRA: the adapters it adds)."""

    total_parameters: int  # the model's own parameters
    trainable_parameters: int  # of them, or the adapters' with LoRA
    extra_parameters: int  # LoRA adapters (0 otherwise): stored beside the model's weights
    largest_layer_parameters: int  # ZeRO-3 gathers one layer at a time
    label: str  # "full", "selection …", "LoRA rank R"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one configuration, by component; `host` is what offload moves to CPU memory (per device)."""

    setup: Setup
    trainable: Trainable
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    host: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers

    def components(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
            "total": self.total,
            "host (offloaded)": self.host,
        }


@dataclass(frozen=True)
class PlannedModel:
    """A model on the meta device with a trainable set: plans any setup for it (activation traces cached per shape)."""

    skeleton: Any  # the transformers model on the meta device, frozen as the run trains it
    trainable: Trainable
    lora_rank: int = 0

    def plan(self, setup: Setup) -> MemoryPlan:
        return plan_memory(self, setup)

    @functools.cached_property
    def _profiles(self) -> dict[tuple[int, bool], ActivationProfile]:
        return {}

    def activations(self, seq_len: int, bf16: bool) -> ActivationProfile:
        key = (seq_len, bf16)
        if key not in self._profiles:
            self._profiles[key] = trace_activations(self.skeleton, seq_len, bf16, every_linear=self.lora_rank > 0)
        return self._profiles[key]


def check_setup(setup: Setup) -> None:
    """The setup's numbers, checked: one clear error for each mistake."""
    if setup.gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {setup.gpus}")
    if setup.zero_stage not in ZERO_STAGES:
        raise InputError(f"unknown --zero-stage {setup.zero_stage}; choose one of 0, 1, 2, 3")
    if setup.seq_len < 1 or setup.micro_batch_size < 1:
        raise InputError(f"--seq-len and --micro-batch-size must be at least 1, got {setup.seq_len} and {setup.micro_batch_size}")
    if setup.offload_params and setup.zero_stage != 3:
        raise InputError("offloading parameters needs ZeRO stage 3")
    if setup.offload_optimizer and setup.zero_stage == 0:
        raise InputError("offloading the optimizer needs ZeRO stage 1, 2 or 3")


def plan_memory(model: PlannedModel, setup: Setup) -> MemoryPlan:
    """Bytes per device of training `model` as `setup` says (see the module's docstring for each component)."""
    check_setup(setup)
    t = model.trainable
    n, zero = setup.gpus, setup.zero_stage
    width = 2 if setup.bf16 else 4
    params = t.total_parameters + t.extra_parameters
    trained = t.trainable_parameters
    shard = n if zero >= 1 else 1

    weights = params * width // (n if zero == 3 else 1)
    if zero == 0:
        gradients = trained * width + (trained * 4 if setup.bf16 else 0)
    elif zero in (1, 2):
        gradients = trained * 4 // n
    else:
        gradients = trained * (width + 4) // n
    master = trained * 4 if (setup.bf16 or zero >= 1) else 0
    optimizer = (master + trained * 8) // shard

    buffers = 0
    if zero >= 1:
        buffers += _bucket(REDUCE_BUCKET, trained, setup) * width
        stepped = trained // n if zero < 3 else min(trained // n, SUB_GROUP)  # ZeRO-3 steps one sub-group at a time
        buffers += STEP_COPIES[setup.device][zero] * stepped * 4
    else:  # the gradients flattened for the all-reduce, on one rank too (exactly their size: no bucket is preallocated)
        buffers += min(ALLREDUCE_BUCKET, trained) * width
    if zero == 3:
        buffers += min(2 * t.largest_layer_parameters, MAX_LIVE_PARAMETERS) * width

    host = 0
    if setup.offload_optimizer:
        fp32_gradients = trained * 4 // n
        host += optimizer + fp32_gradients
        gradients -= fp32_gradients if zero >= 1 else 0
        optimizer = 0
    if setup.offload_params:
        host += weights
        weights = 0
    profile = model.activations(setup.seq_len, setup.bf16)
    activations = profile.bytes(setup.micro_batch_size, setup.gradient_checkpointing)
    return MemoryPlan(setup, t, weights, max(gradients, 0), optimizer, activations, buffers, host)


def _bucket(size: int, trained: int, setup: Setup) -> int:
    return min(size, trained) if setup.device == "cpu" else size


# The order of preference: the first configuration that fits is the cheapest. Offload costs the most
# time (every step crosses PCIe), then ZeRO-3 (gathers every layer twice per step), then checkpointing
# (a second forward); a smaller micro-batch costs throughput but nothing else, so it is tried last
# within each configuration before moving to a costlier one.
PREFERENCE: tuple[tuple[int, bool, bool, bool], ...] = (
    # (zero_stage, gradient_checkpointing, offload_optimizer, offload_params)
    (0, False, False, False),
    (2, False, False, False),
    (2, True, False, False),
    (3, False, False, False),
    (3, True, False, False),
    (2, True, True, False),
    (3, True, True, False),
    (3, True, True, True),
)


def cheapest_fit(model: PlannedModel, setup: Setup, device_memory: int) -> MemoryPlan | None:
    """The first configuration, in PREFERENCE order and then from `setup`'s micro-batch down to 1, whose plan fits
    `device_memory` bytes per device; None when none does. ZeRO 0 is tried only on one device (with several,
    ZeRO-2 costs no more time and shards the optimizer)."""
    for zero, checkpointing, offload_optimizer, offload_params in PREFERENCE:
        if zero == 0 and setup.gpus > 1:
            continue
        batch = setup.micro_batch_size
        while batch >= 1:
            candidate = replace(
                setup,
                zero_stage=zero,
                gradient_checkpointing=checkpointing,
                offload_optimizer=offload_optimizer,
                offload_params=offload_params,
                micro_batch_size=batch,
            )
            plan = plan_memory(model, candidate)
            if plan.total <= device_memory:
                return plan
            batch //= 2
    return None


# --- the model on the meta device --------------------------------------------------------------------


def meta_model(config: Any):
    """The causal LM of a transformers config, on the meta device (no memory, no weights), in fp32 as the runner loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


def load_config(model: str | Path):
    """A transformers config from a model folder, its config.json, or a hub id (only config.json is read)."""
    from transformers import AutoConfig

    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; pass a Hugging Face model folder (or its config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else str(model))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read the model config of {model}: {first}; pass a model folder with config.json or a hub id") from exc


def trainable_of(skeleton, label: str, lora_rank: int = 0) -> Trainable:
    """The parameter counts of `skeleton` as frozen (requires_grad), or with LoRA adapters of `lora_rank` on every linear layer."""
    parameters = dict(skeleton.named_parameters())
    total = sum(p.numel() for p in parameters.values())
    layers = _decoder_layers(skeleton)
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=total)
    if lora_rank:
        adapters = sum(lora_rank * (m.in_features + m.out_features) for m in _lora_targets(skeleton))
        return Trainable(total, adapters, adapters, largest, label)
    trained = sum(p.numel() for p in parameters.values() if p.requires_grad)
    return Trainable(total, trained, 0, largest, label)


def _lora_targets(skeleton) -> Iterator[Any]:
    """The linear layers peft's target_modules="all-linear" adapts: every nn.Linear but the output layer."""
    import torch

    output = skeleton.get_output_embeddings()
    for module in skeleton.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            yield module


def _decoder_layers(skeleton) -> list[Any]:
    """The model's repeated blocks: the largest ModuleList."""
    import torch

    lists = [m for m in skeleton.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


# --- activations, traced on the meta device -------------------------------------------------------------


def trace_activations(skeleton, seq_len: int, bf16: bool, every_linear: bool = False) -> ActivationProfile:
    """What autograd keeps for backward of one sequence of `seq_len` tokens, layer by layer (meta tensors: no memory).

    Each decoder layer runs alone with its parameters' requires_grad flags and an input that requires
    grad when any earlier parameter (embeddings included) is trainable; parameters are not counted
    (they are weights), views count once. `every_linear`: LoRA, whose adapters keep each linear
    layer's input as a trainable weight would (the adapters' rank-r outputs are negligible).
    """
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    config = skeleton.config.get_text_config()
    hidden = config.hidden_size
    layers = _decoder_layers(skeleton)
    model_parameters = {id(p) for p in skeleton.parameters()}

    def trains(module) -> bool:
        return every_linear or any(p.requires_grad for p in module.parameters())

    embeddings = skeleton.get_input_embeddings()
    upstream = bool(embeddings is not None and any(p.requires_grad for p in embeddings.parameters()))
    saved: list[int] = []
    width = 2 if bf16 else 4
    with _meta_attention(), torch.device("meta"):
        hidden_states = torch.empty(1, seq_len, hidden, dtype=dtype)
        positions = torch.arange(seq_len).unsqueeze(0)
        rotary = _rotary(skeleton, hidden_states, positions)
        for layer in layers:
            upstream = upstream or trains(layer)
            if not upstream:
                saved.append(0)
                continue
            x = hidden_states.detach().requires_grad_(True)
            with _flags(layer, every_linear), _cast(layer, dtype):
                saved.append(_saved_bytes(model_parameters, _run_layer, layer, x, positions, rotary))
        head_saved = 0
        norm, head = _final_norm(skeleton), skeleton.get_output_embeddings()
        if upstream or (head is not None and any(p.requires_grad for p in head.parameters())):
            x = hidden_states.detach().requires_grad_(upstream)
            with _cast(norm, dtype), _cast(head, dtype):
                head_saved = _saved_bytes(model_parameters, _loss, skeleton, norm, head, x)
    vocab = config.vocab_size
    return ActivationProfile(tuple(saved), seq_len * hidden * width, head_saved, seq_len * vocab * 4)


def _saved_bytes(parameters: set[int], run: Callable[..., Any], *args: Any) -> int:
    """Bytes of the tensors autograd saves while `run(*args)` runs, parameters aside, each storage once."""
    import torch

    kept: dict[int, Any] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters:
            kept[id(base)] = base  # held: an id is not reused while the trace runs
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(*args)
    return sum(t.numel() * t.element_size() for t in kept.values())


def _run_layer(layer, x, positions, rotary) -> None:
    kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": positions}
    if rotary is not None:
        kwargs["position_embeddings"] = rotary
    layer(x, **kwargs)


def _rotary(skeleton, hidden_states, positions):
    base = getattr(skeleton, "model", skeleton)
    rotary = getattr(base, "rotary_emb", None)
    return rotary(hidden_states, positions) if rotary is not None else None


def _final_norm(skeleton):
    base = getattr(skeleton, "model", skeleton)
    return getattr(base, "norm", None) or getattr(base, "final_layernorm", None)


def _loss(skeleton, norm, head, x) -> None:
    import torch

    states = norm(x) if norm is not None else x
    logits = head(states)
    labels = torch.zeros(logits.shape[:2], dtype=torch.long)
    skeleton.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])


@contextmanager
def _flags(layer, every_linear: bool) -> Iterator[None]:
    """With LoRA, each linear weight stands in for its adapters for the trace (flags restored after)."""
    if not every_linear:
        yield
        return
    import torch

    linears = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    before = [w.requires_grad for w in linears]
    for w in linears:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w, flag in zip(linears, before, strict=True):
            w.requires_grad_(flag)


@contextmanager
def _cast(module, dtype) -> Iterator[None]:
    """Parameters in the training dtype for the trace (DeepSpeed casts them; meta tensors cost nothing), restored after."""
    if module is None:
        yield
        return
    originals = {name: p.data for name, p in module.named_parameters()}
    for p in module.parameters():
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for name, p in module.named_parameters():
            p.data = originals[name]


@contextmanager
def _meta_attention() -> Iterator[None]:
    """scaled_dot_product_attention as the fused kernels run it on a GPU and the CPU (flash attention): backward
    keeps q, k, v, the output and a log-sum-exp per head and position, never the seq_len^2 scores (which the
    meta device's math fallback would keep)."""
    import torch
    import torch.nn.functional as F

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never runs: the trace has no backward
            raise NotImplementedError

    original = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        return Fused.apply(query, key, value)

    F.scaled_dot_product_attention = fused
    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# --- sizes ---------------------------------------------------------------------------------------------


def parse_size(text: str, where: str) -> int:
    """Bytes of "80GiB", "80 GB", "81920MiB" or a plain number of bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"{where} {text!r} is not a size: give a number and a unit, e.g. 80GiB, 80GB or 81920MiB")
    value = int(float(match[1]) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"{where} {text!r} must be more than 0 bytes")
    return value


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"
