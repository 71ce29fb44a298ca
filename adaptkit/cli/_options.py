"""Options shared by several commands, and click options made from the parameter declarations.

* :func:`declared`: a click option for a parameter of :mod:`adaptkit.core.params` (its flag, its click type,
  its choices); the value is then checked by the library function the command calls, with the one rule and
  message of the declaration.
* :func:`output_options`: ``--json`` / ``--csv`` (one at a time) for commands that print a table.
* :func:`progress_options`: ``--quiet`` / ``-q`` and ``--progress/--no-progress``, mapped to one ``progress``
  argument (see :mod:`adaptkit.progress`).
* :func:`fuse_options`: the arguments and options ``fuse`` and ``unfuse`` share.
* ``format_option``, ``base_option``, ``overwrite_option``, ``component_option``, ``report_option``, ``drop_option``
  (``--drop GLOB``, repeatable: the one name of the coverage gate's option, ``drop=[...]`` in Python).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from ..core.params import (
    DTYPE,
    SHARD_SIZE,
    WEIGHTS,
    WORKERS,
    Param,
    ParamType,
    parse_numbers,
)
from ..progress import silence_libraries

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

#: ``ctx.meta`` key: ``--quiet`` was given (notes stay off)
QUIET_KEY = "adaptkit.quiet"


class NumbersType(click.ParamType):
    """Comma-separated numbers (``--weights 1,0.5``), parsed and checked by :func:`~adaptkit.core.params.parse_numbers`."""

    name = "numbers"

    def __init__(self, param: Param) -> None:
        self.param = param

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):  # a default, or a value already converted
            return value
        return parse_numbers(str(value), self.param)  # a ConfigError: one line, like the library's own


def _click_type(param: Param) -> Any:
    if param.type is ParamType.INTEGER:
        return click.INT
    if param.type is ParamType.NUMBER:
        return click.FLOAT
    if param.type is ParamType.CHOICE:
        return click.Choice(param.choices)
    if param.type is ParamType.NUMBERS:
        return NumbersType(param)
    return click.STRING  # sizes: "5GB" is checked by the library


def declared(param: Param, *short: str, **kwargs: Any) -> Decorator:
    """A click option for a declared parameter: ``param.flag`` (plus ``short`` names like ``-r``) and its type.

    ``help`` defaults to the declaration's description; other keyword arguments go to :func:`click.option`.
    """
    if param.flag is None:
        raise ValueError(f"parameter {param.name} has no command-line flag")
    kwargs.setdefault("type", _click_type(param))
    kwargs.setdefault("help", param.description[:1].upper() + param.description[1:] + ".")
    return click.option(param.flag, *short, param.name, **kwargs)


# --------------------------------------------------------------------------------------------- output, progress


def _one_output_format(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Refuse ``--json`` with ``--csv`` while parsing (before a command does any work)."""
    if value:
        chosen = ctx.meta.setdefault("adaptkit.output_format", param.opts[0])
        if chosen != param.opts[0]:
            raise click.UsageError("--json and --csv exclude each other; pass one of them")
    return value


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` and ``--csv`` (one at a time) to a command that prints a table."""
    fn = click.option("--csv", "as_csv", is_flag=True, callback=_one_output_format, help="Print the table as CSV.")(fn)
    return click.option("--json", "as_json", is_flag=True, callback=_one_output_format,
                        help="Print machine-readable JSON.")(fn)


def progress_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet`` / ``-q`` and ``--progress/--no-progress``; the command gets one ``progress: bool | None``.

    ``None`` (neither given): a bar when stderr is a terminal. ``--quiet``: no bar and no notes on stderr (errors
    still print); ``--no-progress``: no bar; ``--progress``: a bar even when stderr is piped.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, progress: bool | None, **kwargs: Any) -> Any:
        if quiet and progress:
            raise click.UsageError("--quiet and --progress exclude each other; pass one of them",
                                   ctx=click.get_current_context())
        click.get_current_context().meta[QUIET_KEY] = quiet
        if quiet or progress is False:
            silence_libraries()
        return fn(*args, progress=False if quiet else progress, **kwargs)

    wrapper = click.option("--progress/--no-progress", default=None,
                           help="Force the progress bar on (even when piped) or off; default: on a terminal.")(wrapper)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar and no notes on stderr.")(wrapper)


# --------------------------------------------------------------------------------------------- shared options

format_option = click.option("--format", "fmt", default=None,
                             help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")


def base_option(purpose: str = "to resolve module names") -> Decorator:
    """``--base``: a base model (hub id or directory) used ``purpose``."""
    return click.option("--base", default=None, help=f"Base model (hub id or dir) {purpose}.")


def overwrite_option(what: str = "an existing output") -> Decorator:
    """``--overwrite``: replace ``what``."""
    return click.option("--overwrite", is_flag=True, help=f"Replace {what}.")


def component_option(peft_part: str) -> Decorator:
    """``--component``: the pipeline component of kohya output; ``peft_part`` says what it does for PEFT output."""
    return click.option("--component", default=None, help="kohya output: the component of bare module paths (unet, "
                        "transformer, text_encoder, text_encoder_2/_3; lycoris keeps lycoris_ names); detected if "
                        f"omitted. PEFT output: {peft_part}")


drop_option = click.option(
    "--drop", "drop", multiple=True, metavar="GLOB",
    help="Accept losing the adapter layers this glob names when they do not land (repeatable): a glob on the layer "
         "path ('*lm_head*', 'model.layers.3.*') or a status ('status:unmatched'); without it, any layer that does "
         "not land is an error. A glob that names no such layer is an error too. See docs/coverage.md.")

report_option = click.option("--report", default=None, help="Also write a self-contained HTML report with plots here "
                             "(needs: pip install 'adaptkit[plot]').")


def fuse_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The arguments and options of ``fuse`` and ``unfuse``."""
    fn = progress_options(output_options(fn))
    for opt in reversed([
        click.argument("base"), click.argument("adapters", nargs=-1, required=True),
        click.option("--out", "-o", default=None, help="Output directory (or .safetensors file for a one-file base)."),
        declared(WEIGHTS, default=None, help="Comma-separated weights, one per adapter (default 1 each)."),
        declared(DTYPE, default=None, help="Output dtype (default: the base's)."),
        declared(SHARD_SIZE, default=None, help="Re-shard the output (e.g. 5GB); default: the base's shards."),
        declared(WORKERS, default=None, help="Files written in parallel (default: one per core)."),
        click.option("--dry-run", is_flag=True, help="List the tensors that would change; write nothing."),
        overwrite_option(),
        click.option("--fsync", is_flag=True, help="Flush files to disk before the rename (power-loss safe; slower)."),
        drop_option,
    ]):
        fn = opt(fn)
    return fn


__all__ = ["QUIET_KEY", "NumbersType", "base_option", "component_option", "declared", "drop_option", "format_option", "fuse_options",
           "output_options", "overwrite_option", "progress_options", "report_option"]
