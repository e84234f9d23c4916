"""Errors a user can act on: each says what was wrong, where, and what to do."""

import errno


class SpectrumError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2


class InputError(SpectrumError):
    """The input (folder, file, argument) is missing, malformed or inconsistent."""


class CorruptWeightsError(SpectrumError):
    """A weight file or tensor cannot be trusted (truncated, unreadable, non-finite)."""

    exit_code = 3


class OutputExistsError(SpectrumError):
    """Writing would replace an existing artifact."""

    exit_code = 4


OS_ERROR_EXIT = 5


def describe_os_error(exc: OSError, where: str | None = None) -> str:
    """What the filesystem (or network) refused, where (`where`, else the error's file name), and what to do."""
    where = f" {where or exc.filename}" if (where or exc.filename) else ""
    advice = {
        errno.ENOSPC: "free some space or choose another location (--out, --work-dir, $SPECTRUM_CACHE)",
        errno.EDQUOT: "free some space or choose another location (--out, --work-dir, $SPECTRUM_CACHE)",
        errno.EACCES: "choose a location you may write to, or fix its permissions",
        errno.EPERM: "choose a location you may write to, or fix its permissions",
        errno.EROFS: "the file system is read-only: choose another location",
        errno.EISDIR: "give a file path, not a folder",
        errno.ENOTDIR: "a parent of the path is a file, not a folder",
        errno.ENOENT: "check the path",
    }.get(exc.errno, "check the path and try again")
    reason = exc.strerror or type(exc).__name__
    return f"{reason}:{where}; {advice}"


# The file system's refusals: the machine, not the input, must change (exit 5, like any OSError the CLI meets).
REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


RECORDED_FAILURE = "spectrum_recorded_failure"  # set on an exception by execute_stage once its failed manifest is stored


def recorded_failure(exc: BaseException) -> str | None:
    """'<step> stage of run <id>' when a failed manifest was stored for the failure that `exc` ended, else None."""
    return getattr(exc, RECORDED_FAILURE, None)
