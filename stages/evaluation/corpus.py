"""Evaluation texts: a run's held-out split, a user's file, and the general corpus of the forgetting probe.

The default general corpus ships with every CPython: the reference documentation topics of
`pydoc_data.topics` (about 465 KB of English prose and examples on 3.11), one document per
paragraph, topics in name order. It works offline and has nothing to do with a domain drop, so
a model that forgets general language does worse on it after training. It changes with the
Python version; its sha256 is recorded with every evaluation.

Every corpus of an evaluation has a role (domain, general) and a dataset name unique within the
evaluation: the fixed names of the run's held-out split and of the default general corpus, or
`<role>:<file or folder name>` for a user's file, so `--data d/test.jsonl --general g/test.jsonl`
gives two datasets, `domain:test.jsonl` and `general:test.jsonl`, never one.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import InputError
from ..data.drops import iter_texts

GENERAL_CORPUS = "python-docs"  # the name of the default general corpus in the evaluation table
DOMAIN, GENERAL, CHAT, TASK = "domain", "general", "chat", "task"  # dataset roles (the evaluation table's role column)


@dataclass(frozen=True)
class Corpus:
    name: str  # the dataset column of the evaluation table, unique within an evaluation
    texts: list[str]
    source: str  # where it came from, for messages and the summary
    role: str  # DOMAIN or GENERAL

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode("utf-8")).hexdigest()


def python_docs() -> Corpus:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    texts = [paragraph.strip() for name in sorted(topics) for paragraph in topics[name].split("\n\n") if paragraph.strip()]
    return Corpus(GENERAL_CORPUS, texts, f"pydoc_data.topics of Python {platform.python_version()}", GENERAL)


def dataset_name(role: str, path: Path) -> str:
    """A user's dataset as the evaluation table names it: its role and its file or folder name (`domain:test.jsonl`)."""
    return f"{role}:{path.resolve().name or path}"


def from_path(path: Path, role: str, text_field: str = "text") -> Corpus:
    """The documents of a local file or folder (.txt lines, .jsonl/.json/.parquet records), as the dataset of `role`."""
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a text file or folder (.txt, .jsonl, .json, .parquet)")
    texts = [text for _, text in iter_texts(path, text_field)]
    if not texts:
        raise InputError(f"{path} holds no documents: the evaluation set is empty")
    return Corpus(dataset_name(role, path), texts, str(path), role)
