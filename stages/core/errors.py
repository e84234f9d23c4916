"""Errors a user can act on: each says what was wrong, where, and what to do."""


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


RECORDED_FAILURE = "spectrum_recorded_failure"  # set on an exception by execute_stage once its failed manifest is stored


def recorded_failure(exc: BaseException) -> str | None:
    """'<step> stage of run <id>' when a failed manifest was stored for the failure that `exc` ended, else None."""
    return getattr(exc, RECORDED_FAILURE, None)
