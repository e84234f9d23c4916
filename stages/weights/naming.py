"""How tensor names map to modules, module types and layer indices (the reference rules)."""

from __future__ import annotations

PARAMETER_SUFFIXES = (".weight",)


def module_name(tensor_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`.

    Only the `.weight` suffix is stripped: the reference tool names results by module, and a
    module's weight is the matrix it scans. Other tensors keep their full name.
    """
    for suffix in PARAMETER_SUFFIXES:
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def module_bias(tensor_name: str) -> str | None:
    """`<module>.weight` -> `<module>.bias`, the parameter a selected module trains with its weight; None for other names."""
    return f"{tensor_name.removesuffix('.weight')}.bias" if tensor_name.endswith(".weight") else None


def module_type(name: str) -> str:
    """Everything after the first all-digit component; the whole name if there is none.

    `model.layers.12.self_attn.q_proj` -> `self_attn.q_proj`; `lm_head` -> `lm_head`.
    """
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[index + 1 :])
    return name


def layer_index(name: str) -> int | None:
    """The first all-digit component of the name, or None (embeddings, final norm, head)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
