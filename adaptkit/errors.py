"""The adaptkit error tree.

Every error adaptkit raises on purpose is an :class:`AdaptkitError`. Each also subclasses the builtin
that fits it, so ``except ValueError`` keeps working for callers who do not know adaptkit. The message
of every error is one sentence that says what is wrong and how to fix it; the CLI prints it as one line
and exits with code 1.
"""

from __future__ import annotations


class AdaptkitError(Exception):
    """Base class of every error adaptkit raises on purpose."""


class FormatError(AdaptkitError, ValueError):
    """A checkpoint is malformed: corrupt file, bad header, contradictory config, wrong shapes."""


class UnsupportedError(AdaptkitError, NotImplementedError):
    """A valid request adaptkit (or the target format) cannot express, with the reason."""


class SourceNotFoundError(AdaptkitError, FileNotFoundError):
    """A hub id, directory or file could not be found or resolved."""


class OutputExistsError(AdaptkitError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class ShapeMismatchError(AdaptkitError, ValueError):
    """Tensors that must agree in shape (A/B ranks, adapter vs base weight) do not."""


class NonFiniteError(AdaptkitError, ValueError):
    """A tensor contains NaN or Inf where a finite value is required."""


class ConfigError(AdaptkitError, ValueError):
    """A config file or argument is missing, unknown or contradicts the tensors.

    Attributes:
        argument: the name of the function argument that is wrong (``"rank"``), when one is; ``None`` for
            config files and combinations of arguments.
    """

    def __init__(self, message: str = "", *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class OutputIsInputError(OutputExistsError):
    """The output path is, contains or lies inside an input: writing it would destroy or change that input."""


class OutputWriteError(AdaptkitError, OSError):
    """The output could not be written: disk full, file too large, read-only or not writable."""


class ArgumentTypeError(AdaptkitError, TypeError):
    """An argument is not of the type a function needs (e.g. a dict where an Adapter is expected)."""
