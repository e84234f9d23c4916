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

from ..base.documents import shown
from ..base.errors import InputError
from ..weights.naming import module_bias
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
    unmatched: tuple[str, ...] = ()
    if selection is None:
        chosen = set(parameters)
    else:
        _require_named_tensors(selection, canonical)
        # A YAML's regexes match named_parameters() names, as Axolotl applies them: a tied lm_head is no name
        # there. selection.json's exact names may use either name of a tied tensor.
        names = canonical if selection.exact_names else {name: name for name in parameters}
        matched = {name for name in names if selection.matches(name)}
        if selection.module_biases:  # a selected module trains its weight and its bias
            matched |= {bias for name in matched if (bias := module_bias(name)) in names}
        chosen = {names[name] for name in matched}
        unmatched = selection.unmatched(list(names))
        if unmatched and chosen:
            log.warning(
                "selection %s: %d pattern(s) match no parameter and are ignored: %s",
                selection.source,
                len(unmatched),
                ", ".join(shown(p) for p in unmatched[:10]) + (" …" if len(unmatched) > 10 else ""),
            )
        if not chosen:
            raise InputError(_nothing_matched(selection, unmatched, list(parameters)))
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


def _require_named_tensors(selection: Selection, canonical: dict[str, str]) -> None:
    """A selection.json's exact names must all exist: a missing one means it was made for another model."""
    if not selection.patterns:
        raise InputError(f"the selection {selection.source} lists no tensor to train; make it again with `spectrum select`, or pass --full")
    missing = [name for name in selection.exact_names if name not in canonical]
    if missing:
        raise InputError(
            f"the selection {selection.source} names {len(missing)} tensor(s) this model does not have "
            f"({', '.join(shown(n) for n in missing[:5])}{' …' if len(missing) > 5 else ''}); this model's parameters are named like "
            f"{_examples(list(canonical))}: it was made for another model: scan and select this model, or pass the selection made for it"
        )


def _nothing_matched(selection: Selection, unmatched: tuple[str, ...], names: list[str]) -> str:
    listed = ", ".join(shown(p) for p in unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
    return (
        f"nothing would be trained: no pattern of the selection {selection.source} matches a parameter of this model "
        f"(matching nothing: {listed or 'every pattern'}); this model's {len(names)} parameters are named like {_examples(names)} "
        "and each pattern is matched from the start of a name (re.match): pass the selection made for this model"
    )


def _examples(names: list[str]) -> str:
    """A few parameter names from the start, the middle and the end of the model, for messages."""
    picks = list(dict.fromkeys([*names[:2], *names[len(names) // 2 : len(names) // 2 + 1], *names[-1:]]))
    return ", ".join(shown(n) for n in picks) + (" …" if len(names) > len(picks) else "")


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing without the input-gradient hook.

    transformers installs `enable_input_require_grads()` whenever checkpointing is enabled on a
    text model; that makes backward run through every frozen layer down to the embeddings and
    erases Spectrum's saving. Non-reentrant checkpointing does not need it, so it is removed.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def aliases(model: torch.nn.Module) -> set[str]:
    """The second names of tied weights (lm_head.weight when it is the input embedding)."""
    return {alias for alias, name in _canonical_names(model).items() if alias != name}


def with_aliases(model: torch.nn.Module, names: set[str]) -> set[str]:
    """`names` (parameter names as named_parameters() gives them) and every other name of the same tensors (tied weights)."""
    return set(names) | {alias for alias, name in _canonical_names(model).items() if name in names}


def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name, aliases of tied weights included, mapped to the name named_parameters() uses."""
    by_identity = {id(p): name for name, p in model.named_parameters()}
    return {name: by_identity[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
