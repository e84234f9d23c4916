"""Every SPECTRUM_* environment variable, read when it is needed (so a call sees its own environment)."""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "SPECTRUM_STORE"  # default artifact store of every command
S3_ENDPOINT_ENV = "SPECTRUM_S3_ENDPOINT_URL"  # S3-compatible endpoint when none is passed
CACHE_ENV = "SPECTRUM_CACHE"  # local copies of stored models and drops
WORK_DIR_ENV = "SPECTRUM_WORK_DIR"  # where stages build outputs before they are stored
DOWNLOAD_RETRY_BASE_ENV = "SPECTRUM_DOWNLOAD_RETRY_BASE_SECONDS"  # first back-off of hub retries


def default_store() -> str | None:
    return os.environ.get(STORE_ENV) or None


def s3_endpoint() -> str | None:
    return os.environ.get(S3_ENDPOINT_ENV) or None


def cache_root() -> Path:
    """$SPECTRUM_CACHE, else ~/.cache/spectrum."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spectrum").expanduser()


def work_root() -> Path:
    """$SPECTRUM_WORK_DIR, else ~/.cache/spectrum/work."""
    return Path(os.environ.get(WORK_DIR_ENV) or cache_root() / "work").expanduser()


def download_retry_base() -> str | None:
    return os.environ.get(DOWNLOAD_RETRY_BASE_ENV)
