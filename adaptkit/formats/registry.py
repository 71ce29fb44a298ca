"""The one table of formats (:data:`FORMATS`), :func:`register_format`, and the lookups built on it.

Everything that depends on which formats exist goes through this table: detection of a local path, hub
file selection (:mod:`adaptkit.formats.hub`), writer options, and what a format can store
(:func:`refusals`, which convert's planning asks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.adapter import Adapter
from ..errors import ConfigError, FormatError
from . import aitoolkit, base, comfyui, diffusers, kohya, peft, xlabs
from .base import Format

#: the one table of formats: name -> format (a module or object with the :class:`~adaptkit.formats.base.Format`
#: surface); detection tries them in this order. :func:`register_format` adds to it.
FORMATS: dict[str, Format] = {
    "peft": peft,  # type: ignore[dict-item]
    "kohya": kohya,  # type: ignore[dict-item]
    "diffusers": diffusers,  # type: ignore[dict-item]
    "comfyui": comfyui,  # type: ignore[dict-item]
    "xlabs": xlabs,  # type: ignore[dict-item]
    "ai-toolkit": aitoolkit,  # type: ignore[dict-item]
}
#: other names users type for a format
ALIASES: dict[str, str] = {"lycoris": "kohya", "musubi": "kohya", "sd-scripts": "kohya", "original": "comfyui",
                           "bfl": "comfyui", "comfy": "comfyui", "aitoolkit": "ai-toolkit", "ostris": "ai-toolkit"}


def register_format(fmt: Any, *, aliases: tuple[str, ...] = ()) -> Any:
    """Add a format to :data:`FORMATS`: ``ak.load`` detects it, ``ak.save``/``convert`` write it.

    Args:
        fmt: a module or object with the members of :class:`adaptkit.formats.base.Format` (``NAME``, ``LABEL``,
            ``LOOKED_FOR``, ``ALLOW_PATTERNS``, ``WRITE_OPTIONS``, ``detect``, ``detect_keys``, ``select_files``,
            ``is_adapter_file``, ``read_tensors``, ``read``, ``can_store``, ``can_name``, ``can_store_adapter``,
            ``check_options``,
            ``write``). It is tried after the formats registered before it.
        aliases: other names for it (``"lycoris"`` is kohya's).

    Returns:
        ``fmt``, unchanged.

    Raises:
        ConfigError: a member is missing, ``NAME`` is not lower case, or the name or an alias is taken by another
            format.
    """
    missing = base.missing_members(fmt)
    if missing:
        raise ConfigError(f"{fmt!r} lacks the format member(s) {', '.join(missing)}; see docs/formats.md for the "
                          "Format protocol")
    name = str(fmt.NAME)
    if name != name.lower() or not name:
        raise ConfigError(f"format NAME {name!r} is not a lower-case name; name it as users type it, e.g. 'toyfmt'")
    for key in (name, *(a.lower() for a in aliases)):
        owner = ALIASES.get(key, key)
        if owner in FORMATS and FORMATS[owner] is not fmt:
            raise ConfigError(f"format name '{key}' is taken by {owner}; choose another NAME or alias")
    FORMATS[name] = fmt
    ALIASES.update({a.lower(): name for a in aliases})
    return fmt


def format_module(name: str) -> Format:
    """The format for a name or alias; :class:`ConfigError` listing the known ones otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        known = ", ".join(sorted([*FORMATS, *ALIASES]))
        raise ConfigError(f"unknown format '{name}'; known formats: {known}")
    return FORMATS[key]


def detect(path: Path) -> str:
    """Name of the format a local path is in, from its files and keys (never from the file name).

    Raises:
        FormatError: no format recognises it (the message lists what was looked for, and the subfolders that
            hold adapters, if any, with how to load one as ``'DIR:sub'``), or several do (the message lists
            them and says to pass ``format=``).
    """
    found = [name for name, fmt in FORMATS.items() if fmt.detect(path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise FormatError(f"{path} fits several adapter layouts ({', '.join(found)}); pass format=... (--format / "
                          "'from->to') to say which")
    subs = adapter_subfolders(path)
    hint = (f"it holds adapters in subfolders {subs}: load one as '{path}:{subs[0]}'" if subs
            else "pass format=... (--format on the command line) if you know what it is")
    raise FormatError(f"{path} is not a recognised adapter checkpoint (looked for: {', '.join(FORMATS)}); {hint}")


def namespace_of(format: str, **options: Any) -> str | None:
    """The namespace (``"diffusers"`` / ``"original"``) a format writes diffusion-transformer layers in, ``None``
    for "as they are" (a format without a ``namespace`` function, or kohya without ``naming``)."""
    fn = getattr(format_module(format), "namespace", None)
    return fn(**options) if fn is not None else None


def adapter_subfolders(path: str | os.PathLike) -> list[str]:
    """Names of the immediate subfolders of a local directory that hold an adapter of a known format.

    PEFT saves every adapter but the default in a subfolder named after it, and collections of adapters are
    often laid out one per subfolder; such a directory is loaded as ``'DIR:sub'``. Unreadable subfolders
    are skipped (loading one says what is wrong with it).
    """
    root = Path(path)
    if not root.is_dir():
        return []
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if any(fmt.detect(sub) for fmt in FORMATS.values()):
                found.append(sub.name)
        except (FormatError, OSError):
            continue
    return found


def check_write_options(format: str, **options: Any) -> None:
    """Refuse writer options the format does not have, or bad values of its own, before any work is done.

    Raises:
        ConfigError: an option of other formats only (``naming`` is kohya's, ``component`` kohya's and PEFT's),
            or a bad value (the format's ``check_options``).
    """
    fmt = format_module(format)
    for option, value in options.items():
        if value is None or option in fmt.WRITE_OPTIONS:
            continue
        owners = sorted((f for f in FORMATS.values() if option in f.WRITE_OPTIONS), key=lambda f: f.NAME)
        if not owners:
            raise ConfigError(f"no format has a writer option '{option}'; drop it (the options are "
                              f"{', '.join(sorted({o for f in FORMATS.values() for o in f.WRITE_OPTIONS}))})")
        raise ConfigError(f"{option} (--{option}) applies to {' and '.join(f.LABEL for f in owners)} output only, "
                          f"not {fmt.NAME}; drop it or write {' or '.join(f.NAME for f in owners)}")
    fmt.check_options(**{k: v for k, v in options.items() if v is not None})


def refusals(format: str, adapter: Adapter, *, paths: bool = True, **options: Any) -> dict[str, str]:
    """What a format cannot store of an adapter: ``{layer path or extra tensor name: reason}`` (see
    :func:`adaptkit.formats.base.refusals`; ``paths=False`` leaves out module paths the format has no name for)."""
    return base.refusals(format_module(format), adapter, paths=paths, **options)


def check_storable(format: str, adapter: Adapter, **options: Any) -> None:
    """Refuse an adapter the format cannot store; the message suggests a registered format that can.

    Raises:
        UnsupportedError: see :func:`adaptkit.formats.base.check_storable`.
    """
    base.check_storable(format_module(format), adapter, FORMATS.values(), **options)


__all__ = ["ALIASES", "FORMATS", "adapter_subfolders", "check_storable", "check_write_options", "detect",
           "format_module", "namespace_of", "refusals", "register_format"]
