"""``adaptkit analyze`` and ``adaptkit compare``: per-layer spectra of one adapter; how adapters interfere."""

from __future__ import annotations

import click

from ..core.params import DENSITY
from ._options import (
    base_option,
    declared,
    format_option,
    output_options,
    progress_options,
    report_option,
)
from ._render import note, print_json, render_table


@click.command()
@click.argument("source")
@format_option
@base_option("to resolve module names (kohya files)")
@report_option
@progress_options
@output_options
def analyze(source: str, fmt: str | None, base: str | None, report: str | None, progress: bool | None, as_json: bool,
            as_csv: bool) -> None:
    """Per-layer analysis: ||dW||, spectral norm, stable/effective rank, 90/99% energy rank, energy share, sparsity.

    Examples:

    \b
      adaptkit analyze ./my-adapter --report r.html   # spectra and energy; HTML needs: pip install 'adaptkit[plot]'
      adaptkit analyze lora.safetensors --base ./base-model --json
    """
    from ..analysis.layers import analyze_adapter

    result = analyze_adapter(source, format=fmt, base=base, report=report, progress=progress)
    render_table(result.table, as_json=as_json, as_csv=as_csv, header=None if as_csv else result.summary())
    if report:
        note(f"report written to {report}")


@click.command()
@click.argument("sources", nargs=-1, required=True)
@declared(DENSITY, default=0.2, show_default=True,
          help="Fraction of largest entries kept per adapter for the TIES sign-conflict rate.")
@format_option
@base_option("to resolve module names (kohya files)")
@report_option
@progress_options
@output_options
def compare(sources: tuple[str, ...], density: float, fmt: str | None, base: str | None, report: str | None,
            progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Compare adapters: cosine similarity and sign conflicts per layer and pair, shared targets, merge suggestion.

    Examples:

    \b
      adaptkit compare ./a ./b --json           # how two adapters interfere, and a merge method suggestion
      adaptkit compare ./a ./b ./c --density 0.2 --report compare.html
    """
    from ..analysis.compare import compare_adapters

    result = compare_adapters(list(sources), density=density, format=fmt, base=base, report=report, progress=progress)
    if as_json:
        print_json(result.to_dict())
    elif as_csv:
        render_table(result.layers, as_csv=True)
    else:
        render_table(result.pairs)
        click.echo("")
        render_table(result.layers)
        click.echo(f"\nsuggested merge method: {result.method} ({result.reason})")
    if report:
        note(f"report written to {report}")


COMMANDS = (analyze, compare)
