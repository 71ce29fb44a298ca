"""Checkpoint formats. Each format module has the same surface:

* ``NAME``: the format's name;
* ``ALLOW_PATTERNS``: the files it needs, as patterns (used offline; online :func:`load` lists the repo
  and downloads exactly one adapter's files, see ``_select_hub_files``);
* ``detect(path) -> bool``: whether a local file or directory is in this format;
* ``read(path, *, source=None, **options) -> Adapter``;
* ``write(adapter, path, *, overwrite=False, **options) -> Path``.

``FORMATS`` is the one table of formats; :func:`load` and :func:`save` dispatch through it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.adapter import Adapter
from ..errors import ArgumentTypeError, ConfigError, FormatError, SourceNotFoundError
from ..io.outputs import check_output
from ..io.sources import resolve_selected
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
        FormatError: no format recognises it (the message lists what was looked for, and the subfolders that
            hold adapters, if any, with how to load one as ``'DIR:sub'``).
    """
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    subs = adapter_subfolders(path)
    hint = (f"it holds adapters in subfolders {subs}: load one as '{path}:{subs[0]}'" if subs
            else "pass format=... (--format on the command line) if you know what it is")
    raise FormatError(f"{path} is not a recognised adapter checkpoint (looked for: {', '.join(FORMATS)}); {hint}")


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
            if any(module.detect(sub) for module in FORMATS.values()):
                found.append(sub.name)
        except (FormatError, OSError):
            continue
    return found


def _allow_patterns(fmt: str | None) -> list[str] | None:
    if fmt is not None:
        return list(format_module(fmt).ALLOW_PATTERNS)
    patterns: list[str] = []
    for module in FORMATS.values():
        patterns += [p for p in module.ALLOW_PATTERNS if p not in patterns]
    return patterns


#: full-model weights that sit beside adapters in some repos: never a kohya candidate
_MODEL_WEIGHTS = re.compile(
    r"^(?:(?:model|pytorch_model|diffusion_pytorch_model|consolidated)(?:\.fp16|\.bf16)?|.+-\d{5}-of-\d{5})\.safetensors$"
)
_LOOKED_FOR = {
    "peft": f"{peft.CONFIG_NAME} + {peft.WEIGHT_NAMES[0]}",
    "diffusers": diffusers.WEIGHT_NAME,
    "kohya": "one kohya/LyCORIS .safetensors file",
}


def _adapter_file(name: str) -> bool:
    """Whether a file name marks an adapter: a PEFT config, diffusers LoRA weights, or a non-model ``.safetensors``."""
    return name in (peft.CONFIG_NAME, diffusers.WEIGHT_NAME, diffusers.LEGACY_WEIGHT_NAME) or (
        name.endswith(".safetensors") and not _MODEL_WEIGHTS.match(name))


def _select_hub_files(fmt: str | None, files: list[str], sub: str | None, repo_spec: str) -> tuple[list[str], str | None]:
    """Pick the files of the one adapter at ``sub`` of a hub repo from the repo's file names.

    PEFT (``adapter_config.json`` + weights) first, then diffusers (``pytorch_lora_weights.safetensors``),
    then a single kohya/LyCORIS ``.safetensors`` at the top of the (sub)folder; ``fmt`` restricts the
    choice to one format. A ``sub`` that names a file selects that file (plus its PEFT config or weights).

    Returns:
        ``(repo paths to download, repo path to read)``, as :func:`adaptkit.sources.resolve_selected` wants.

    Raises:
        SourceNotFoundError: no adapter of the format there, or several kohya candidates (the message
            lists them and says how to name one).
    """
    names = set(files)
    peft_names = (peft.CONFIG_NAME, *peft.WEIGHT_NAMES)
    if sub and sub in names:  # one file of the repo
        folder, _, base = sub.rpartition("/")
        if base in peft_names:  # a PEFT file needs its config (or weights) beside it
            prefix = f"{folder}/" if folder else ""
            weights = next((prefix + n for n in peft.WEIGHT_NAMES if prefix + n in names), None)
            wanted = [prefix + n for n in (peft.CONFIG_NAME,) if prefix + n in names]
            wanted += [sub] if base in peft.WEIGHT_NAMES else [weights] if weights else []
            return wanted, sub
        return [sub], sub
    prefix = f"{sub}/" if sub else ""
    top = sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])
    want = format_module(fmt).NAME if fmt else None
    peft_weights = next((n for n in peft.WEIGHT_NAMES if n in top), None)
    if want in (None, "peft") and peft_weights:
        chosen = [n for n in (peft.CONFIG_NAME,) if n in top] + [peft_weights]
        return [prefix + n for n in chosen], sub
    diffusers_weights = next((n for n in (diffusers.WEIGHT_NAME, diffusers.LEGACY_WEIGHT_NAME) if n in top), None)
    if want in (None, "diffusers") and diffusers_weights:
        return [prefix + diffusers_weights], prefix + diffusers_weights
    models = [n for n in top if n.endswith(".safetensors") and _MODEL_WEIGHTS.match(n)]
    if want in (None, "kohya"):
        candidates = [n for n in top if n.endswith(".safetensors") and n not in models]
        if len(candidates) == 1:
            return [prefix + candidates[0]], prefix + candidates[0]
        if candidates:
            raise SourceNotFoundError(
                f"{repo_spec}{':' + sub if sub else ''} holds {len(candidates)} candidate adapter files "
                f"({', '.join(candidates)}); name the one to load, e.g. '{repo_spec}:{prefix}{candidates[0]}'"
            )
    where = f"{repo_spec}:{sub}" if sub else repo_spec
    looked = _LOOKED_FOR[want] if want else "; ".join(_LOOKED_FOR.values())
    subs = sorted({rel.split("/")[0] for f in files if f.startswith(prefix) and (rel := f[len(prefix):]).count("/") == 1
                   and _adapter_file(rel.split("/")[1])})
    if subs:
        hint = f"it holds adapters in subfolders {subs}: load one as '{repo_spec}:{prefix}{subs[0]}'"
    elif models:
        hint = f"it holds only model weights ({', '.join(models[:3])}); name the file as '{repo_spec}:{prefix}<file>' if it is an adapter"
    else:
        hint = f"name the adapter's file or subfolder as '{repo_spec}:<path>'"
    raise SourceNotFoundError(f"no adapter found in {where} (looked for {looked}); {hint}")


def load(source: str | os.PathLike, format: str | None = None, base: str | None = None, **options: Any) -> Adapter:
    """Load an adapter checkpoint into an :class:`~adaptkit.graph.Adapter`.

    Args:
        source: hub id (``org/name[@revision][:subfolder]``, the subfolder may name one file), directory
            (``dir`` or ``dir:subfolder``) or file. From the hub only the files of this one adapter are
            downloaded: the repo is listed first and the format chosen from the file names.
        format: ``"peft"``, ``"kohya"``/``"lycoris"`` or ``"diffusers"``; detected when ``None``.
        base: base model (hub id or directory) used by formats whose module names need resolving.
        **options: passed to the format's reader.

    Returns:
        The adapter, with ``source`` set to its provenance (hub commit or absolute path).

    Raises:
        SourceNotFoundError: the source does not exist, holds no adapter, or holds several kohya
            candidates (name one as ``org/name:file.safetensors``). FormatError / ConfigError: it cannot
            be read.
    """
    select = functools.partial(_select_hub_files, format)
    resolved = resolve_selected(source, select, allow_patterns=_allow_patterns(format))
    name = format_module(format).NAME if format else detect(resolved.path)
    if base is not None:
        options["base"] = base
    return FORMATS[name].read(resolved.path, source=resolved.provenance, subfolder=resolved.subfolder, **options)


def save(adapter: Adapter, path: str | os.PathLike, format: str = "peft", overwrite: bool = False, **options: Any) -> Path:
    """Write an adapter in a format, atomically (nothing is left behind on error).

    Args:
        adapter: the adapter to write.
        path: output directory (PEFT, diffusers) or file (kohya ``.safetensors``).
        format: ``"peft"``, ``"kohya"``/``"lycoris"`` or ``"diffusers"``.
        overwrite: replace an existing output.
        **options: writer options; kohya's ``naming``, and ``component`` for kohya and PEFT (see
            :func:`adaptkit.converters.kohya.write` and :func:`adaptkit.converters.peft.write`).

    Returns:
        The path written.

    Raises:
        ArgumentTypeError: ``adapter`` is not an :class:`~adaptkit.graph.Adapter`.
        OutputIsInputError: ``path`` is, contains or lies inside the adapter's own source.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        UnsupportedError: the format cannot express the adapter (the message says what to do).
        ConfigError: a writer option the format does not have (``naming`` other than kohya, ``component``
            for diffusers), or an unknown ``component``.
    """
    if not isinstance(adapter, Adapter):
        raise ArgumentTypeError(
            f"save needs an Adapter, got {type(adapter).__name__}; load or build one first, "
            "e.g. ak.save(ak.load(SOURCE), OUT) or ak.save(ak.merge([...]), OUT)"
        )
    module = format_module(format)
    check_write_options(module.NAME, **options)
    check_output(path, overwrite, inputs=[adapter])
    return module.write(adapter, path, overwrite=overwrite, **options)


def check_write_options(format: str, **options: Any) -> None:
    """Refuse writer options the format does not have, before any work is done.

    Raises:
        ConfigError: ``naming`` other than kohya, ``component`` for diffusers, or an unknown ``component``.
    """
    name = format_module(format).NAME
    if options.get("naming") is not None and name != kohya.NAME:
        raise ConfigError(f"naming (--naming) applies to kohya output only, not {name}; drop it or write kohya")
    component = options.get("component")
    if component is None:
        return
    if name == kohya.NAME:
        kohya.check_component(component)
    elif name == peft.NAME:
        peft.check_component(component)
    else:
        raise ConfigError(f"component (--component) applies to kohya and PEFT output only, not {name}: a {name} file "
                          "holds every pipeline component; drop it")


__all__ = ["ALIASES", "FORMATS", "adapter_subfolders", "check_write_options", "detect", "format_module", "load", "save"]
