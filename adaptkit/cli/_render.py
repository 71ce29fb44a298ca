"""How the command line prints results: a table (a pandas DataFrame) as text, JSON or CSV, and notes on stderr.

Text tables print every row and column (``DataFrame.to_string`` never truncates), floats as ``{:.4g}``, after an optional header of ``key  value`` lines.
``--json`` prints the rows as a list of objects (NaN as ``null``), inside ``{**header, "layers": rows}`` when the
command has a header; ``--csv`` prints the rows only. Notes (``report written to ...``) go to stderr and are
silenced by ``--quiet``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from ._options import QUIET_KEY


def json_default(o: Any) -> Any:
    """JSON for NumPy scalars (their ``.item()``) and anything else (its ``str``)."""
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def print_json(payload: Any) -> None:
    """Print ``payload`` as indented JSON (NumPy scalars as numbers)."""
    click.echo(json.dumps(payload, indent=2, default=json_default))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def is_certificate(value: Any) -> bool:
    """True for a coverage certificate (:class:`~adaptkit.core.coverage.Certificate`; told by its surface, so that
    this module does not import the library)."""
    return hasattr(value, "summary") and hasattr(value, "to_dict") and hasattr(value, "energy_share")


def render_table(df: Any, as_json: bool = False, as_csv: bool = False, header: dict[str, Any] | None = None,
                 float_format: str = "{:.4g}") -> None:
    """Print a DataFrame (and an optional header dict) as text, JSON or CSV.

    Args:
        df: the table.
        as_json: print ``rows`` (or ``{**header, "layers": rows}``) as JSON.
        as_csv: print the rows as CSV (the header is left out).
        header: ``key: value`` facts printed above a text table (dict values as ``a: b, c: d``); a coverage
            certificate value prints as its summary lines (text) or its ``to_dict()`` (JSON).
        float_format: how text tables print floats.
    """
    certificates = {k: v for k, v in (header or {}).items() if is_certificate(v)}
    if as_csv:
        click.echo(df.to_csv(index=False), nl=False)
        return
    if as_json:
        rows = [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        if header is not None:
            header = {k: (v.to_dict() if k in certificates else v) for k, v in header.items()}
        print_json({**header, "layers": rows} if header is not None else rows)
        return
    if header:
        plain = {k: v for k, v in header.items() if k not in certificates}
        width = max((len(k) for k in plain), default=0)
        for k, v in plain.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items()) or "-"
            click.echo(f"{k.ljust(width)}  {v}")
        for cert in certificates.values():
            click.echo(cert.summary())
        click.echo("")
    if df.empty:
        click.echo("(no rows)")
        return
    click.echo(df.to_string(index=False, float_format=lambda x: float_format.format(x)))  # every row and column


def note(message: str) -> None:
    """Print a note on stderr (``report written to ...``), unless ``--quiet``."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not ctx.meta.get(QUIET_KEY):
        click.echo(message, err=True)


__all__ = ["is_certificate", "json_default", "note", "print_json", "render_table"]
