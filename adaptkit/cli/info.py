"""``adaptkit info`` and ``adaptkit status``: what is inside a checkpoint, as a header and a per-layer table;
``adaptkit kinds``: what every operation does with every adapter kind (the capability table)."""

from __future__ import annotations

import click

from ._options import base_option, format_option, output_options, progress_options
from ._render import render_table


@click.command()
@click.argument("source")
@format_option
@base_option()
@click.option("--layers/--no-layers", default=True, help="Print the per-layer table.")
@progress_options
@output_options
def info(source: str, fmt: str | None, base: str | None, layers: bool, progress: bool | None, as_json: bool,
         as_csv: bool) -> None:
    """Show what is inside an adapter: format, kinds, base model, ranks, size, and a per-layer table.

    Examples:

    \b
      adaptkit info ./my-adapter                # format, kinds, ranks, size, per-layer table
      adaptkit info org/name@v1 --json          # the same for machines (also --csv)
      adaptkit info lora.safetensors --base ./base-model --no-layers   # + coverage of that base
    """
    from ..live.status import describe_checkpoint

    table, header = describe_checkpoint(source, format=fmt, base=base, progress=progress)
    if base is not None:  # which layers land on the base, from its headers/configs (informational: exit 0)
        from ..analysis.coverage import coverage

        header = {**header, "coverage": coverage(source, base)}
    if not layers:
        table = table.iloc[0:0]
    if not (as_json or as_csv):
        table = table.drop(columns=["tensors"])
    render_table(table, as_json=as_json, as_csv=as_csv, header=header)


@click.command()
@click.argument("source")
@format_option
@base_option()
@progress_options
@output_options
def status(source: str, fmt: str | None, base: str | None, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Per-layer status of a checkpoint: kind, shape, rank, alpha, scale, dtype, ||dW||, finite.

    Examples:

    \b
      adaptkit status ./my-adapter              # text table
      adaptkit status org/name@main --json      # list of rows (also --csv)
      adaptkit status lora.safetensors --base ./base-model
    """
    from ..live.status import describe_checkpoint

    table, _ = describe_checkpoint(source, format=fmt, base=base, progress=progress)
    if not (as_json or as_csv):
        table = table.drop(columns=["tensors"])
    render_table(table, as_json=as_json, as_csv=as_csv)


@click.command()
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (as docs/formats.md holds it).")
@progress_options
@output_options
def kinds(markdown: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """The adapter kinds and what each operation does with them: read/write per format, fuse, unfuse, merge,
    convert to LoRA, inject (exact, lossy (report), needs base, refused: why).

    Examples:

    \b
      adaptkit kinds                            # one row per kind
      adaptkit kinds --json                     # the same for machines (also --csv)
      adaptkit kinds --markdown                 # the table of docs/formats.md
    """
    from ..capabilities import capability_markdown, capability_table

    if markdown:
        click.echo(capability_markdown(), nl=False)
        return
    render_table(capability_table().reset_index(), as_json=as_json, as_csv=as_csv)


COMMANDS = (info, status, kinds)
