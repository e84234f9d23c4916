"""How a pipeline config's errors name a key: as written when short, and with a did-you-mean among the known ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from stages.base.documents import shown


def suggest(word: Any, choices: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest of `choices`, else ''."""
    if not isinstance(word, str) or len(word) > 100:  # difflib is quadratic in the word's length
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def key_name(key: Any) -> str:
    """A key as a message shows it: as written if short text, else bounded."""
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else shown(key, 60)
