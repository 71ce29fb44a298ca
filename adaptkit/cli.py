"""The ``adaptkit`` command line: a thin click layer over the library.

Every command parses its arguments, calls ONE library function and renders the result. Errors are one
line on stderr (``error: ...``) with exit code 1 and no traceback; set ``ADAPTKIT_DEBUG=1`` to get one.
Tables print as text, or as JSON/CSV with ``--json`` / ``--csv``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import __version__


def _debug() -> bool:
    return os.environ.get("ADAPTKIT_DEBUG", "") not in {"", "0", "false", "False"}


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any exception into one ``error: ...`` line and exit code 1 (traceback with ADAPTKIT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import AdaptkitError

        try:
            return fn(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except AdaptkitError as e:
            if _debug():
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(1)
        except Exception as e:  # an unexpected failure: still one line, the type tells what broke
            if _debug():
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: {type(e).__name__}: {msg} (set ADAPTKIT_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` and ``--csv`` to a command that prints a table."""
    fn = click.option("--csv", "as_csv", is_flag=True, help="Print the table as CSV.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)
    return fn


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def render_table(df: Any, as_json: bool = False, as_csv: bool = False, header: dict[str, Any] | None = None,
                 float_format: str = "{:.4g}") -> None:
    """Print a DataFrame (and an optional header dict) as text, JSON or CSV."""
    if as_csv:
        click.echo(df.to_csv(index=False), nl=False)
        return
    if as_json:
        rows = [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        payload: Any = {**header, "layers": rows} if header is not None else rows
        click.echo(json.dumps(payload, indent=2, default=_json_default))
        return
    if header:
        width = max(len(k) for k in header)
        for k, v in header.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items()) or "-"
            click.echo(f"{k.ljust(width)}  {v}")
        click.echo("")
    if df.empty:
        click.echo("(no rows)")
        return
    with _pandas_display():
        click.echo(df.to_string(index=False, float_format=lambda x: float_format.format(x)))


def _pandas_display():
    import pandas as pd

    return pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                             "display.max_colwidth", 80)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="adaptkit")
def main() -> None:
    """adaptkit: adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3) across PEFT, kohya/LyCORIS and diffusers.

    SOURCE arguments are hub ids (org/name[@revision][:subfolder]), directories or files.
    """
    if not _debug():  # third-party warnings are noise on a command line; adaptkit's own stay visible
        import warnings

        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"adaptkit(\..*)?")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@main.command()
@click.argument("source")
@click.option("--format", "fmt", default=None, help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names.")
@click.option("--layers/--no-layers", default=True, help="Print the per-layer table.")
@output_options
@handle_errors
def info(source: str, fmt: str | None, base: str | None, layers: bool, as_json: bool, as_csv: bool) -> None:
    """Show what is inside an adapter: format, kinds, base model, ranks, size, and a per-layer table."""
    from .converters import load
    from .status import checkpoint_status, checkpoint_summary

    adapter = load(source, format=fmt, base=base)
    table = checkpoint_status(adapter)
    if not layers:
        table = table.iloc[0:0]
    header = checkpoint_summary(adapter)
    if not (as_json or as_csv):
        table = table.drop(columns=["tensors"])
    render_table(table, as_json=as_json, as_csv=as_csv, header=header)


@main.command()
@click.option("--out", "-o", default="adaptkit-demo", show_default=True, help="Directory for the demo's outputs.")
@handle_errors
def demo(out: str) -> None:
    """Run the main path end to end on the bundled example adapters."""
    from .demo import run_demo

    run_demo(out, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
