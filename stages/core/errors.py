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
