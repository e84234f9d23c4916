"""Chat data for supervised fine-tuning: conversations rendered with the chat template, loss on assistant tokens only.

Rows are `{"messages": [{"role", "content"}, …]}` or `{"prompt": …, "completion": …}` (the two
layouts TRL reads), in .jsonl, .json or .parquet files. Each conversation is rendered with the
tokenizer's chat template (or --chat-template); the label of every token is -100 (no loss)
except the tokens of assistant turns, found by rendering the conversation up to each assistant
turn with the generation prompt and up to its end: the template must render each prefix as a
prefix, which a clear error reports otherwise. Rows are truncated or padded to seq_len.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from ..base.errors import InputError
from ..base.files import all_files, write_atomic
from ..data.drops import iter_records
from .packing import is_heldout
from .settings import TrainingArrays

IGNORE = -100
MODEL_TEMPLATE = "the model's chat template"
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class ChatData:
    arrays: TrainingArrays
    record: dict[str, Any]  # held-out split and counts, published as heldout.json


def conversations(folder: Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(where, messages) for every row of the chat files in `folder` (or of the one file `folder` names)."""
    paths = [folder] if folder.is_file() else [folder / name for name in all_files(folder)]
    if not paths:
        raise InputError(f"the chat data {folder} is empty: it holds no .jsonl/.json/.parquet files")
    for path in paths:
        if path.suffix.lower() not in CHAT_SUFFIXES:
            raise InputError(f"{path} is not chat data ({', '.join(CHAT_SUFFIXES)} with messages or prompt/completion rows)")
        for where, record in iter_records(path, path.suffix.lower()):
            yield where, _messages(record, where)


def _messages(record: object, where: str) -> list[dict[str, str]]:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
    elif isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + (
            completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        )
    else:
        fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{where} is not a chat row: it needs `messages` or `prompt` and `completion` (it has: {fields})")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise InputError(f"{where}: every message needs a string `role` and `content`, found {message!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where} has no assistant turn, so there is nothing to learn from it; remove the row or add the answer")
    return messages


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], where: str, template: str = MODEL_TEMPLATE
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (-100 outside assistant turns); `template` names the template."""
    ids = _render(tokenizer, messages, where, False, template)
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:index], where, True, template) if index else []
        upto = _render(tokenizer, messages[: index + 1], where, False, template)
        if upto[: len(prefix)] != prefix or ids[: len(upto)] != upto:
            raise InputError(
                f"{where}: the chat template does not render each turn as a prefix of the conversation, so the assistant "
                "tokens cannot be located; pass a --chat-template that renders turns one after another"
            )
        labels[len(prefix) : len(upto)] = ids[len(prefix) : len(upto)]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, generation_prompt: bool, template: str) -> list[int]:
    budget = _StepBudget(MAX_TEMPLATE_STEPS)
    previous = sys.gettrace()
    sys.settrace(budget)
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    except _TemplateTooLong as exc:
        raise InputError(
            f"{where}: {template} ran more than {MAX_TEMPLATE_STEPS:,} template steps rendering one conversation "
            "(loops within loops?); fix the template so a conversation renders in proportion to its length"
        ) from exc
    except Exception as exc:  # jinja and template errors come in many kinds
        raise InputError(f"{where}: {template} failed to render this conversation: {exc}") from exc
    finally:
        sys.settrace(previous)
    return list(rendered)


# Lines of template code one rendering may run: a real template runs a few per message, so this is
# ample for any conversation and stops a template whose loops never end (the sandbox bounds each
# range, not loops nested in loops) within seconds.
MAX_TEMPLATE_STEPS = 2_000_000


class _TemplateTooLong(Exception):
    pass


class _StepBudget:
    """A trace function counting the lines run in Jinja's compiled template code (only there: other frames are not traced)."""

    def __init__(self, steps: int):
        self.left = steps

    def __call__(self, frame: FrameType, event: str, arg: object) -> Callable | None:
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame: FrameType, event: str, arg: object) -> Callable:
        self.left -= 1
        if self.left < 0:
            raise _TemplateTooLong
        return self._line


def prepare_chat(
    folder: Path, tokenizer: Any, seq_len: int, heldout_percent: float, heldout_file: Path | None = None, template: str = MODEL_TEMPLATE
) -> ChatData:
    """Training rows of the chat data; the held-out conversations go to `heldout_file` as {"messages": …} lines.

    `template` names the chat template in errors (the --chat-template file, or the model's own).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template; pass --chat-template FILE (a Jinja template)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_ids, rows_labels, rows_mask = [], [], []
    heldout = {
        "rule": "sha256 of the row's messages as canonical JSON, as for cpt documents",
        "percent": heldout_percent,
        "rows": 0,
        "row_sha256": [],
    }
    truncated = 0
    held: list[str] = []
    for where, messages in conversations(folder):
        canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if is_heldout(canonical, heldout_percent):
            heldout["rows"] += 1
            heldout["row_sha256"].append(hashlib.sha256(canonical.encode("utf-8")).hexdigest())
            held.append(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            continue
        ids, labels = tokenize_conversation(tokenizer, messages, where, template)
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels):
            continue  # its answer lies beyond seq_len
        padding = seq_len - len(ids)
        rows_ids.append(ids + [pad] * padding)
        rows_labels.append(labels + [IGNORE] * padding)
        rows_mask.append([1] * len(ids) + [0] * padding)
    if not rows_ids:
        raise InputError(f"the chat data {folder} leaves no row to train on (held out, or answers beyond --seq-len {seq_len})")
    if heldout_file is not None:
        write_atomic(heldout_file, "".join(held).encode("utf-8"), overwrite=True)
    arrays = TrainingArrays(np.asarray(rows_ids, np.int64), np.asarray(rows_labels, np.int64), np.asarray(rows_mask, np.int64))
    record = {**heldout, "training_rows": len(rows_ids), "truncated_rows": truncated, "seq_len": seq_len}
    return ChatData(arrays, record)


def read_chat_template(path: str | None) -> str | None:
    """The text of a --chat-template file (a Jinja template), or None."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"--chat-template {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"--chat-template {path} is not UTF-8 text (a Jinja template)") from exc
