"""How the command line reports a failure: one ``error: ...`` line on stderr, exit code 1, no traceback.

Every failure passes through :class:`AdaptkitGroup`, whatever raised it and when (while click parses the
arguments, or while the command runs), so no command formats an error itself:

* an :class:`~adaptkit.errors.AdaptkitError`: its message, which already says what is wrong and how to fix it;
* a click usage error (unknown option, missing argument, bad choice): click's three-line block rewritten as one
  line that ends with ``(see 'adaptkit CMD --help')``;
* Ctrl-C: ``error: interrupted; nothing was written`` (outputs are atomic);
* a closed stdout (``adaptkit info X | head``): nothing more, exit code 1;
* anything else: the exception's type and first line, with a pointer to ``ADAPTKIT_DEBUG=1``.

With ``ADAPTKIT_DEBUG=1`` adaptkit's and unexpected errors propagate with their traceback instead (usage errors
stay one line). In the style of ``huggingface_hub``'s ``cli/_errors.py``: the mapping from exception to
message is written once, here.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from ..errors import AdaptkitError


def debug() -> bool:
    """Whether ``ADAPTKIT_DEBUG`` asks for tracebacks (set, and not ``0``/``false``)."""
    return os.environ.get("ADAPTKIT_DEBUG", "") not in {"", "0", "false", "False"}


class OneLineError(click.ClickException):
    """A failure printed as one ``error: ...`` line with exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def usage_line(e: click.ClickException) -> OneLineError:
    """Rewrite click's three-line usage error as ``<what is wrong> (see 'adaptkit CMD --help')``."""
    if isinstance(e, click.exceptions.NoSuchOption):
        msg = e.message.rstrip(".") + (f"; did you mean {' or '.join(e.possibilities)}?" if e.possibilities else "")
    else:
        msg = e.format_message().rstrip(".")
    msg = " ".join(msg.split())
    if msg[:1].isupper() and msg[1:2].islower():  # "Missing argument 'SOURCE'" -> "missing argument 'SOURCE'"
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        msg += f" (see '{ctx.command_path} --help')"
    return OneLineError(msg)


def error_line(e: BaseException) -> str:
    """The one line (without ``error: ``) that reports an exception a command raised."""
    if isinstance(e, AdaptkitError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; nothing was written"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (set ADAPTKIT_DEBUG=1 for a traceback)"


def _fail(e: BaseException) -> NoReturn:
    """Report ``e`` as one line and exit with code 1 (a closed stdout: nothing to report)."""
    if isinstance(e, BrokenPipeError):  # the reader went away: stop quietly, and let the final flush go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    else:
        click.echo(f"error: {error_line(e)}", err=True)
    sys.exit(1)


class AdaptkitGroup(click.Group):
    """The ``adaptkit`` group: every failure of parsing or running a command becomes one ``error: ...`` line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:  # `adaptkit` alone: click's help
            raise
        except click.ClickException as e:
            raise usage_line(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.NoArgsIsHelpError, OneLineError, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as e:
            raise usage_line(e) from e
        except (Exception, KeyboardInterrupt) as e:
            if debug() and not isinstance(e, (KeyboardInterrupt, BrokenPipeError)):
                raise  # ADAPTKIT_DEBUG=1: the traceback
            _fail(e)


__all__ = ["AdaptkitGroup", "OneLineError", "debug", "error_line", "usage_line"]
