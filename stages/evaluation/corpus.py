"""Evaluation texts: a run's held-out split, a user's file, and the general corpus of the forgetting probe.

The default general corpus ships with every CPython: the reference documentation topics of
`pydoc_data.topics` (about 465 KB of English prose and examples on 3.11), one document per
paragraph, topics in name order. It works offline and has nothing to do with a domain drop, so
a model that forgets general language does worse on it after training. It changes with the
Python version; its sha256 is recorded with every evaluation.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError
from ..data.drops import iter_texts

GENERAL_CORPUS = "python-docs"  # the name of the default general corpus in the evaluation table


@dataclass(frozen=True)
class Corpus:
    name: str  # the dataset column of the evaluation table
    texts: list[str]
    source: str  # where it came from, for messages and the summary

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.texts, ensure_ascii=False).encode("utf-8")).hexdigest()


def python_docs() -> Corpus:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    texts = [paragraph.strip() for name in sorted(topics) for paragraph in topics[name].split("\n\n") if paragraph.strip()]
    return Corpus(GENERAL_CORPUS, texts, f"pydoc_data.topics of Python {platform.python_version()}")


def from_path(path: Path, name: str, text_field: str = "text") -> Corpus:
    """The documents of a local file or folder (.txt lines, .jsonl/.json/.parquet records)."""
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a text file or folder (.txt, .jsonl, .json, .parquet)")
    texts = [text for _, text in iter_texts(path, text_field)]
    if not texts:
        raise InputError(f"{path} holds no documents: the evaluation set is empty")
    return Corpus(name, texts, str(path))
