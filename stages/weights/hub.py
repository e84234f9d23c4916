"""The Hugging Face hub client: settings from the environment, bounded retries, errors that say what to do."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..base import settings
from ..base.errors import InputError, SpectrumError
from ..base.files import all_files

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_DEFAULT_ENDPOINT = "https://huggingface.co"
RETRY_ATTEMPTS = 3
RETRY_BASE_DEFAULT_S = 2.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class HubUnavailableError(SpectrumError):
    """The Hugging Face hub could not be reached, even after bounded retries."""


def is_hub_id(source: str) -> bool:
    """`org/name` that is not an existing local folder."""
    return HUB_ID.fullmatch(source) is not None and not source.startswith((".", "~")) and not Path(source).exists()


@dataclass(frozen=True)
class HubSettings:
    """Read when a download runs (not when huggingface_hub is imported), so the environment of the call counts."""

    endpoint: str
    offline: bool
    cache_dir: Path

    @classmethod
    def from_environment(cls) -> HubSettings:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE or any(
            (os.environ.get(name) or "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        if os.environ.get("HF_HUB_CACHE"):
            cache = Path(os.environ["HF_HUB_CACHE"])
        elif os.environ.get("HF_HOME"):
            cache = Path(os.environ["HF_HOME"]) / "hub"
        else:
            cache = Path(constants.HF_HUB_CACHE)
        endpoint = (os.environ.get("HF_ENDPOINT") or HUB_DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint=endpoint, offline=offline, cache_dir=cache.expanduser())


def fetch_snapshot(repo_id: str, revision: str, patterns: list[str], hub: HubSettings) -> Path:
    """The local snapshot folder holding the files of `repo_id`@`revision` that match `patterns`."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            local_files_only=hub.offline,
        )
    )


def repo_files(repo_id: str, commit: str, hub: HubSettings, snapshot: Path) -> list[str]:
    """Every file of the repo at `commit`, from the tree listing snapshot_download cached (no network)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return sorted(entry.path for entry in get_cached_repo_tree(repo_id, revision=commit, cache_dir=hub.cache_dir))
    except CachedRepoTreeNotFoundError:  # an offline cache written by an older huggingface_hub: what is there
        return all_files(snapshot)


def retrying(action: Callable[[], T], label: str, hub: HubSettings) -> T:
    """Run `action`, retrying network failures with exponential backoff; other errors pass through at once."""
    base = retry_base_seconds()
    attempt = 1
    while True:
        try:
            return action()
        except Exception as exc:
            cause = _network_failure(exc)
            if cause is None:
                raise
            if attempt == RETRY_ATTEMPTS:
                raise HubUnavailableError(
                    f"could not reach the Hugging Face hub at {hub.endpoint} for {label} after {RETRY_ATTEMPTS} attempts "
                    f"({cause}); check the network and $HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache"
                ) from exc
        delay = base * 2 ** (attempt - 1)
        log.warning("attempt %d of %d for %s failed (%s); retrying in %.1fs", attempt, RETRY_ATTEMPTS, label, cause, delay)
        time.sleep(delay)
        attempt += 1


def _network_failure(exc: BaseException) -> str | None:
    """A short description if `exc` (or what caused it) is a connection failure, timeout or server error."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OfflineModeIsEnabled):
            return None
        if isinstance(seen, httpx2.TransportError):
            return f"{type(seen).__name__}: {seen}"
        if isinstance(seen, HfHubHTTPError):
            status = seen.response.status_code
            return f"HTTP {status} from the server" if status >= 500 or status == 429 else None
        seen = seen.__cause__ or seen.__context__
    return None


def retry_base_seconds() -> float:
    raw = settings.download_retry_base()
    try:
        value = float(raw) if raw else RETRY_BASE_DEFAULT_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise InputError(f"${settings.DOWNLOAD_RETRY_BASE_ENV} must be a number of seconds >= 0, not {raw!r}")
    return value


@contextmanager
def hub_errors(repo_id: str, revision: str, hub: HubSettings) -> Iterator[None]:
    """huggingface_hub's exceptions as errors that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RevisionNotFoundError as exc:
        raise InputError(
            f"revision {revision!r} of hub model {repo_id} does not exist at {hub.endpoint}; pass an existing branch, tag or commit"
        ) from exc
    except GatedRepoError as exc:
        raise InputError(
            f"hub model {repo_id} is gated at {hub.endpoint}: accept its terms on the hub and set $HF_TOKEN to an account that did"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise InputError(
            f"hub model {repo_id} was not found at {hub.endpoint} (no local folder has that name either); check the id, "
            "or set $HF_TOKEN if the repository is private"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if hub.offline:
            raise InputError(
                f"offline mode (HF_HUB_OFFLINE) is on and hub model {repo_id}@{revision} is not (completely) in the local "
                f"cache {hub.cache_dir}; download it once online, or pass a local model folder"
            ) from exc
        raise InputError(f"hub model {repo_id}@{revision} could not be fetched from {hub.endpoint}: {_first_line(exc)}") from exc
    except HfHubHTTPError as exc:
        raise InputError(
            f"the hub at {hub.endpoint} refused hub model {repo_id}@{revision} (HTTP {exc.response.status_code}); "
            "check $HF_TOKEN and your access to the repository"
        ) from exc
    except HFValidationError as exc:
        raise InputError(f"hub model {repo_id}@{revision}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
