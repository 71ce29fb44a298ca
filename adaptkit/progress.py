"""Progress bars: the one way adaptkit reports progress, for the library and the command line alike.

Every function that can run for more than a second takes ``progress: bool | None`` and draws its bars with
:func:`bar`:

* ``None`` (the default): a bar on stderr only when stderr is a terminal; piped, redirected to a log, in
  tests or in a notebook kernel (whose stderr is no terminal) nothing is printed;
* ``True``: always (a notebook gets tqdm's widget where ``ipywidgets`` is installed);
* ``False``: never.

The command line maps ``--quiet`` / ``-q`` and ``--no-progress`` to ``False``, ``--progress`` to ``True`` and
leaves ``None`` otherwise (see :mod:`adaptkit.cli`). Bars are tqdm's (a declared dependency), write to
stderr only, so stdout stays the command's result, and vanish when done (``leave=False``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

#: the size assumed when a terminal reports none (a pseudo-terminal nobody sized): tqdm would draw nothing
FALLBACK_COLUMNS, FALLBACK_LINES = 80, 24


def _stderr() -> Any:
    return sys.stderr if sys.stderr is not None else sys.__stderr__


def enabled(progress: bool | None) -> bool:
    """Whether to draw a bar: ``progress`` when given, else whether stderr is a terminal.

    Args:
        progress: ``True`` / ``False`` to force, ``None`` for "only on a terminal".

    Returns:
        ``True`` when a bar should be drawn.
    """
    if progress is not None:
        return bool(progress)
    stream = _stderr()
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or exotic stream
        return False


def _unsized(stream: Any) -> bool:
    """True for a terminal that reports a width of 0 (tqdm would then draw nothing at all)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns == 0
    except (AttributeError, ValueError, OSError):
        return False


def silence_libraries() -> None:
    """Turn off the progress bars of huggingface_hub and transformers (downloads, ``save_pretrained``) too.

    What ``--quiet`` does besides passing ``progress=False``: both honour ``HF_HUB_DISABLE_PROGRESS_BARS`` when
    imported later, and their switches are flipped if they already are.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        progress: bool | None = None, unit_scale: bool = False, position: int | None = None) -> Any:
    """A tqdm progress bar on stderr, drawn or not by :func:`enabled`.

    Args:
        iterable: what to iterate over (``None`` for a bar advanced with ``.update(n)``).
        desc: the label (``"merge (ties_svd)"``, ``"fuse"``).
        total: number of steps (default: ``len(iterable)`` when it has one).
        unit: what a step is (``"layer"``, ``"tensor"``, ``"B"``).
        progress: ``True`` / ``False`` / ``None`` (only on a terminal), as everywhere in adaptkit.
        unit_scale: show k/M/G prefixes (for byte counts).
        position: the line of the bar when several are drawn at once (fuse's per-file bars).

    Returns:
        A ``tqdm`` object: iterate over it, or call ``.update(n)`` and ``.close()`` (it is a context manager).
    """
    from tqdm.auto import tqdm

    on = enabled(progress)
    stream = _stderr()
    fixed = on and _unsized(stream)
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, position=position,
                leave=False, disable=not on, file=stream, ncols=FALLBACK_COLUMNS if fixed else None,
                nrows=FALLBACK_LINES if fixed else None, dynamic_ncols=on and not fixed)


__all__ = ["FALLBACK_COLUMNS", "FALLBACK_LINES", "bar", "enabled", "silence_libraries"]
