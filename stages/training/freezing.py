"""Apply a selection to a model: every parameter frozen except the selected ones, verified before training.

Frozen parameters have `requires_grad=False`, so autograd makes no gradient buffers for them and
the optimizer (built from the trainable parameters only) keeps no state for them. With embeddings
frozen, backward stops at the lowest trainable tensor: nothing here (or in activation
checkpointing, see `enable_checkpointing`) asks for gradients of the inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..core.errors import InputError
from .selection import Selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezeReport:
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_parameters: int
    total_parameters: int
    unmatched_patterns: tuple[str, ...]  # YAML patterns that match no parameter (Axolotl ignores them)


def apply_selection(model: torch.nn.Module, selection: Selection | None) -> FreezeReport:
    """Freeze everything but `selection` (None: train everything, the full fine-tuning baseline)."""
    canonical = _canonical_names(model)
    parameters = dict(model.named_parameters())  # tied weights appear once, under their canonical name
    if selection is None:
        chosen = set(parameters)
        unmatched: tuple[str, ...] = ()
    else:
        chosen = {canonical[name] for name in canonical if selection.matches(name)}
        if selection.exact_names:
            missing = [name for name in selection.exact_names if name not in canonical]
            if missing:
                raise InputError(
                    f"the selection {selection.source} names {len(missing)} tensor(s) this model does not have "
                    f"({', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}); it was made for another model: "
                    "scan and select this model, or pass the selection made for it"
                )
        unmatched = tuple(p for p in selection.patterns if not any(_match(p, name) for name in canonical))
        if unmatched:
            log.warning(
                "selection %s: %d pattern(s) match no parameter and are ignored: %s", selection.source, len(unmatched), ", ".join(unmatched)
            )
    if not chosen:
        raise InputError(
            f"nothing would be trained: the selection {selection.source if selection else ''} matches no parameter of this model; "
            "check that it was made for this model"
        )
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in chosen)
    trainable = tuple(name for name in parameters if name in chosen)
    actual = {name for name, p in model.named_parameters() if p.requires_grad}
    if actual != set(trainable):  # a module that re-enabled gradients behind our back
        raise InputError(f"after freezing, the trainable parameters differ from the selection: {sorted(actual ^ set(trainable))}")
    return FreezeReport(
        trainable=trainable,
        frozen=tuple(name for name in parameters if name not in chosen),
        trainable_parameters=sum(parameters[n].numel() for n in trainable),
        total_parameters=sum(p.numel() for p in parameters.values()),
        unmatched_patterns=unmatched,
    )


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing without the input-gradient hook.

    transformers installs `enable_input_require_grads()` whenever checkpointing is enabled on a
    text model; that makes backward run through every frozen layer down to the embeddings and
    erases Spectrum's saving. Non-reentrant checkpointing does not need it, so it is removed.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name, aliases of tied weights included, mapped to the name named_parameters() uses."""
    by_identity = {id(p): name for name, p in model.named_parameters()}
    return {name: by_identity[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def _match(pattern: str, name: str) -> bool:
    import re

    return re.match(pattern, name) is not None
