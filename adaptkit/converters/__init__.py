"""Checkpoint formats. Each format module has the same surface:

* ``NAME``: the format's name;
* ``ALLOW_PATTERNS``: the files a hub download needs;
* ``detect(path) -> bool``: whether a local file or directory is in this format;
* ``read(path, *, source=None, **options) -> Adapter``;
* ``write(adapter, path, *, overwrite=False, **options) -> Path``.

``FORMATS`` is the one table of formats; :func:`load` and :func:`save` dispatch through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError, FormatError
from ..graph import Adapter
from ..sources import resolve
from . import diffusers, kohya, peft

FORMATS: dict[str, ModuleType] = {
    "peft": peft,
    "kohya": kohya,
    "diffusers": diffusers,
}
#: other names users type for a format
ALIASES: dict[str, str] = {"lycoris": "kohya"}


def format_module(name: str) -> ModuleType:
    """The format module for a name or alias; :class:`ConfigError` listing the known ones otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        known = ", ".join(sorted([*FORMATS, *ALIASES]))
        raise ConfigError(f"unknown format '{name}'; known formats: {known}")
    return FORMATS[key]


def detect(path: Path) -> str:
    """Name of the format a local path is in.

    Raises:
        FormatError: no format recognises it (the message lists what was looked for).
    """
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    raise FormatError(
        f"{path} is not a recognised adapter checkpoint (looked for: {', '.join(FORMATS)}); "
        "pass format=... (--format on the command line) if you know what it is"
    )


def _allow_patterns(fmt: str | None) -> list[str] | None:
    if fmt is not None:
        return list(format_module(fmt).ALLOW_PATTERNS)
    patterns: list[str] = []
    for module in FORMATS.values():
        patterns += [p for p in module.ALLOW_PATTERNS if p not in patterns]
    return patterns


def load(source: str | os.PathLike, format: str | None = None, base: str | None = None, **options: Any) -> Adapter:
    """Load an adapter checkpoint into an :class:`~adaptkit.graph.Adapter`.

    Args:
        source: hub id (``org/name[@revision][:subfolder]``), directory (``dir`` or ``dir:subfolder``)
            or file.
        format: ``"peft"``, ``"kohya"``/``"lycoris"`` or ``"diffusers"``; detected when ``None``.
        base: base model (hub id or directory) used by formats whose module names need resolving.
        **options: passed to the format's reader.

    Returns:
        The adapter, with ``source`` set to its provenance (hub commit or absolute path).

    Raises:
        SourceNotFoundError: the source does not exist. FormatError / ConfigError: it cannot be read.
    """
    resolved = resolve(source, allow_patterns=_allow_patterns(format))
    name = format_module(format).NAME if format else detect(resolved.path)
    if base is not None:
        options["base"] = base
    return FORMATS[name].read(resolved.path, source=resolved.provenance, **options)


def save(adapter: Adapter, path: str | os.PathLike, format: str = "peft", overwrite: bool = False, **options: Any) -> Path:
    """Write an adapter in a format, atomically (nothing is left behind on error).

    Args:
        adapter: the adapter to write.
        path: output directory (PEFT, diffusers) or file (kohya ``.safetensors``).
        format: ``"peft"``, ``"kohya"``/``"lycoris"`` or ``"diffusers"``.
        overwrite: replace an existing output.

    Returns:
        The path written.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        UnsupportedError: the format cannot express the adapter (the message says what to do).
    """
    return format_module(format).write(adapter, path, overwrite=overwrite, **options)


__all__ = ["ALIASES", "FORMATS", "detect", "format_module", "load", "save"]
