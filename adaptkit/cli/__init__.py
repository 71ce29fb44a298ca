"""The ``adaptkit`` command line: a thin click layer over the library.

Every command parses its arguments, calls ONE library function and renders the result. The package holds:

* ``__init__`` (here): the group :func:`main` (the ``adaptkit`` console script, ``adaptkit.cli:main``) and the
  registration of every command;
* :mod:`._errors`: every failure as one ``error: ...`` line on stderr with exit code 1 (``ADAPTKIT_DEBUG=1``: a
  traceback instead);
* :mod:`._render`: tables as text, JSON (``--json``) or CSV (``--csv``), and notes on stderr;
* :mod:`._options`: options shared by several commands (``--json/--csv``, ``--quiet/--progress``, the fuse
  options) and options built from the parameter declarations of :mod:`adaptkit.core.params`;
* one module per command group: :mod:`.info` (info, status), :mod:`.merge`, :mod:`.convert`, :mod:`.fuse`
  (fuse, unfuse, extract), :mod:`.loftq`, :mod:`.analyze` (analyze, compare), :mod:`.deploy` (check, export),
  :mod:`.demo`.

Commands that can take more than a second draw a progress bar on stderr when it is a terminal
(:mod:`adaptkit.progress`); ``--quiet`` / ``-q`` turns bars and notes off, ``--progress`` forces the bar when piped.
Every command's help ends with examples. ``adaptkit --help``, ``--version`` and ``COMMAND --help`` import neither
torch nor pandas: these modules import only click and adaptkit's light modules at the top, and each command
imports the library function it calls when it runs.
"""

from __future__ import annotations

import os
import warnings

import click

from .._version import __version__
from . import analyze, convert, demo, deploy, fuse, info, loftq, merge
from ._errors import AdaptkitGroup, debug
from .merge import MERGE_METHODS


@click.group("adaptkit", cls=AdaptkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="adaptkit")
def main() -> None:
    """adaptkit: adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3) across PEFT, kohya/LyCORIS and diffusers.

    SOURCE arguments are hub ids (org/name[@revision][:subfolder]), directories or files. Long-running commands
    draw a progress bar on a terminal (--quiet / -q: none). `adaptkit COMMAND --help` shows each command's
    options and examples.

    Examples:

    \b
      adaptkit info ./my-adapter                # format, kinds, ranks, size, per-layer table
      adaptkit merge ./a ./b -o merged/ --weights 1,0.5 --method ties_svd --density 0.2 --rank 16
      adaptkit convert '->kohya' ./my-adapter lora.safetensors
      adaptkit demo                             # the main path on the bundled examples
    """
    if not debug():  # third-party warnings are noise on a command line; adaptkit's own stay visible
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"adaptkit(\..*)?")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


for _group in (info, merge, convert, fuse, loftq, analyze, deploy, demo):
    for _command in _group.COMMANDS:
        main.add_command(_command)

__all__ = ["MERGE_METHODS", "main"]
