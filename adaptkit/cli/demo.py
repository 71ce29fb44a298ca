"""``adaptkit demo``: the main path end to end on the bundled example adapters."""

from __future__ import annotations

import click

from ._options import progress_options


@click.command()
@click.option("--out", "-o", default="adaptkit-demo", show_default=True, help="Directory for the demo's outputs.")
@progress_options
def demo(out: str, progress: bool | None) -> None:
    """Run the main path end to end on the bundled example adapters.

    Examples:

    \b
      adaptkit demo                             # writes ./adaptkit-demo/
      adaptkit demo --out /tmp/adaptkit-demo -q
    """
    from ..demo import run_demo

    run_demo(out, echo=click.echo, progress=progress)


COMMANDS = (demo,)
