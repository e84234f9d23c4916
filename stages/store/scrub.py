"""Refusing credentials in manifests: they are stored forever, so secrets must never reach them."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import SecretLeakError

_SECRET_WORDS = {
    "token", "password", "passwd", "passphrase", "secret", "secrets", "authorization",
    "auth", "bearer", "credential", "credentials", "cookie", "apikey", "accesskey", "secretkey",
}  # fmt: skip
_SECRET_PAIRS = {("access", "key"), ("api", "key"), ("key", "id"), ("private", "key"), ("session", "key")}
_SECRET_VALUES = [
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA|AROA|AIDA|AGPA)[A-Z0-9]{16}\b")),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("a GitHub token", re.compile(r"\b(ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}\b")),
    ("a bearer token", re.compile(r"\bbearer\s+\S{8,}", re.IGNORECASE)),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a URL with a password", re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)),
]
# A scheme starts where no scheme character precedes it: without the look-behind every position
# inside a long run of letters would start a match attempt, quadratic in the text's length.
_URL_CREDENTIALS = re.compile(r"(?<![a-z0-9+.-])(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
# 40 random base64 characters: the shape of an AWS secret access key. Requiring both cases and
# a digit or '/+' keeps hex digests (git commits, sha1) and plain words from matching.
_AWS_SECRET = re.compile(r"(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9/+])[A-Za-z0-9/+]{40}")
_MIN_ENV_SECRET = 8


def looks_secret_name(name: str) -> bool:
    """True for names like `hf_token`, `AWS_SECRET_ACCESS_KEY`, `apiKey`; false for `max_tokens`, `cache_key`."""
    words = [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", name)]
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Refuse parameter names that look like credentials, at any depth (values are checked too)."""
    for path, name in _names(parameters, "parameters"):
        if looks_secret_name(name):
            raise SecretLeakError(
                f"{path} looks like a credential; manifests must never hold secrets: pass it through "
                "the environment (e.g. HF_TOKEN, AWS_SECRET_ACCESS_KEY) instead of as a parameter"
            )
    check_values(parameters, "parameters")


def check_values(document: Any, where: str) -> None:
    """Refuse strings that look like credentials, or that contain the value of a secret-named environment variable."""
    for path, value in _strings(document, where):
        stripped = value.strip()
        if _AWS_SECRET.fullmatch(stripped):
            raise SecretLeakError(f"{path} looks like an AWS secret access key; manifests must never hold secrets")
        for label, pattern in _SECRET_VALUES:
            if pattern.search(value):
                raise SecretLeakError(f"{path} contains what looks like {label}; manifests must never hold secrets")
    text = json.dumps(document, ensure_ascii=False)
    for variable, secret in os.environ.items():
        if len(secret) >= _MIN_ENV_SECRET and looks_secret_name(variable) and secret in text:
            raise SecretLeakError(f"{where} contains the value of ${variable}; manifests must never hold secrets")


def redact(text: str) -> str:
    """`text` with the credentials of any URL (`scheme://user:password@host`) replaced by `***`."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def _names(document: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(document, Mapping):
        for name, value in document.items():
            yield f"{path}.{name}", str(name)
            yield from _names(value, f"{path}.{name}")
    elif isinstance(document, (list, tuple)):
        for index, value in enumerate(document):
            yield from _names(value, f"{path}[{index}]")


def _strings(document: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(document, str):
        yield path, document
    elif isinstance(document, Mapping):
        for name, value in document.items():
            yield from _strings(value, f"{path}.{name}")
    elif isinstance(document, (list, tuple)):
        for index, value in enumerate(document):
            yield from _strings(value, f"{path}[{index}]")
