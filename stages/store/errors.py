"""Errors raised by the artifact store (all are SpectrumErrors the CLI reports and exits on)."""

from __future__ import annotations

from ..base.errors import OS_ERROR_EXIT, InputError, SpectrumError


class StoreError(SpectrumError):
    """The store failed to read or write an artifact."""


class StoreUnavailableError(StoreError):
    """The store's server could not be reached, even after bounded retries."""


class StoreRefusedError(StoreError):
    """The file system under a file store refused a write or read (disk full, read-only, no permission)."""

    exit_code = OS_ERROR_EXIT


class CredentialsRejectedError(StoreError):
    """The store refused the credentials (or found none)."""


class IntegrityError(StoreError):
    """Bytes read or written do not match their recorded sha256 or size."""

    exit_code = 3


class ArtifactNotFoundError(InputError):
    """A key (or a version of it) does not exist in the store."""


class SecretLeakError(InputError):
    """Something about to be written to a manifest looks like a credential."""
