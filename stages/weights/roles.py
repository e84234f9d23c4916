"""Which checkpoint tensors are the input embeddings and the output head, for any architecture.

The model class is built from config.json on the meta device (no weights, no memory) and asked
for `get_input_embeddings()` / `get_output_embeddings()`; their parameter names are then matched
to the checkpoint's tensor names. Tied embeddings resolve both roles to the same tensor.

Building the class costs torch and transformers (about 3 s and 400 MiB on 2 cores) while the rest
of a CPU scan needs neither, and the answer depends only on config.json, the tensor names and the
transformers version: it is kept under $SPECTRUM_CACHE/roles keyed by their sha256, so every later
scan of the same model or of a fine-tune of it (each generation of a model line) reads it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.errors import InputError
from ..base.files import write_atomic
from ..base.settings import cache_root
from .naming import module_name

if TYPE_CHECKING:
    import torch

INPUT_EMBEDDINGS = "input_embeddings"
OUTPUT_EMBEDDINGS = "output_embeddings"
ROLES = (OUTPUT_EMBEDDINGS, INPUT_EMBEDDINGS)  # the reference lists lm_head first

# Used only when no model config can be consulted (e.g. a reference JSON on its own).
CONVENTIONAL_NAMES = {
    INPUT_EMBEDDINGS: ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings"),
    OUTPUT_EMBEDDINGS: ("lm_head", "embed_out", "output"),
}


@dataclass(frozen=True)
class RoleMap:
    tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> tensor names
    source: str = "unavailable"

    def names(self, role: str) -> tuple[str, ...]:
        return self.tensors.get(role, ())


MODEL_CONFIG = "model-config"


def roles_from_model_config(model_dir: Path, tensor_names: list[str]) -> RoleMap:
    """Resolve roles through the model's own class, or read them from the cache; an unknown architecture gives an empty map."""
    if not (model_dir / "config.json").is_file():
        return RoleMap(source="unavailable: no config.json in the model folder")
    try:
        entry = _cache_entry((model_dir / "config.json").read_bytes(), tensor_names)
    except OSError as exc:  # as the class could not be built from it either
        return RoleMap(source=f"unavailable: config.json could not be read ({exc})")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # a missing or damaged entry is resolved again
        cached = json.loads(entry.read_bytes())
        tensors = {role: tuple(cached[role]) for role in ROLES if role in cached}
        if all(name in tensor_names for names in tensors.values() for name in names):
            return RoleMap(tensors=tensors, source=MODEL_CONFIG)
    resolved = _resolve_through_class(model_dir, tensor_names)
    if resolved.source == MODEL_CONFIG:
        with contextlib.suppress(OSError, InputError):  # an unwritable cache only costs the next scan the resolution
            write_atomic(entry, json.dumps({role: list(names) for role, names in resolved.tensors.items()}).encode(), overwrite=True)
    return resolved


def _cache_entry(config: bytes, tensor_names: list[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(metadata.version("transformers").encode() + b"\0")
    digest.update(config + b"\0")
    digest.update("\n".join(sorted(tensor_names)).encode())
    return cache_root() / "roles" / f"{digest.hexdigest()}.json"


def _resolve_through_class(model_dir: Path, tensor_names: list[str]) -> RoleMap:
    try:
        model = _meta_model(model_dir)
    except Exception as exc:  # any architecture transformers cannot build offline
        return RoleMap(source=f"unavailable: transformers could not build the model from config.json ({type(exc).__name__}: {exc})")
    names = set(tensor_names)
    resolved: dict[str, tuple[str, ...]] = {}
    for role, module in ((INPUT_EMBEDDINGS, model.get_input_embeddings()), (OUTPUT_EMBEDDINGS, _output_embeddings(model))):
        weight = getattr(module, "weight", None) if module is not None else None
        if weight is None:
            continue
        candidates = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
        matches = sorted({m for c in candidates for m in _checkpoint_matches(c, names)})
        if matches:
            resolved[role] = tuple(matches)
    return RoleMap(tensors=resolved, source=MODEL_CONFIG)


def roles_from_conventional_names(tensor_names: list[str]) -> RoleMap:
    resolved: dict[str, tuple[str, ...]] = {}
    for role, keys in CONVENTIONAL_NAMES.items():
        for key in keys:
            matches = tuple(n for n in tensor_names if module_name(n).split(".")[-1] == key)
            if matches:
                resolved[role] = matches
                break
    return RoleMap(tensors=resolved, source="conventional-names")


def _meta_model(model_dir: Path) -> torch.nn.Module:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except ValueError:
            return AutoModel.from_config(config, trust_remote_code=False)


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    module = model.get_output_embeddings()
    if module is None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return model.get_input_embeddings()
    return module


def _checkpoint_matches(parameter_name: str, tensor_names: set[str]) -> list[str]:
    """The checkpoint may add or drop a base-model prefix (`model.`, `bert.`): match on suffixes."""
    if parameter_name in tensor_names:
        return [parameter_name]
    return [t for t in tensor_names if t.endswith("." + parameter_name) or parameter_name.endswith("." + t)]
