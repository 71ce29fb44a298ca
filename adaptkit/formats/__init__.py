"""Checkpoint formats: one module per format with the same surface, and :func:`load` / :func:`save`.

The surface is the :class:`~adaptkit.formats.base.Format` protocol (``NAME``, ``detect``, ``select_files``,
``read_tensors``, ``read``, ``can_store``, ``can_store_adapter``, ``write``, ...). :data:`FORMATS` is the one
table of formats (:mod:`adaptkit.formats.registry`); :func:`register_format` adds one, and :func:`load` and
:func:`save` dispatch through it. Hub file selection asks each format (:mod:`adaptkit.formats.hub`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.adapter import Adapter
from ..core.coverage import Certificate, CoverageError, LayerCoverage, read_metadata
from ..errors import ArgumentTypeError
from ..io.outputs import check_output
from ..io.sources import resolve_selected
from .arch.remap import to_namespace
from .hub import allow_patterns
from .hub import select_hub_files as _select_hub_files
from .registry import (
    ALIASES,
    FORMATS,
    adapter_subfolders,
    check_storable,
    check_write_options,
    detect,
    format_module,
    namespace_of,
    refusals,
    register_format,
)


def load(source: str | os.PathLike, format: str | None = None, base: str | None = None,
         drop: Sequence[str] | str | None = None, strict_drop: bool = True, **options: Any) -> Adapter:
    """Load an adapter checkpoint into an :class:`~adaptkit.graph.Adapter`.

    Args:
        source: hub id (``org/name[@revision][:subfolder]``, the subfolder may name one file), directory
            (``dir`` or ``dir:subfolder``) or file. From the hub only the files of this one adapter are
            downloaded: the repo is listed first and the format chosen from the file names.
        format: ``"peft"``, ``"kohya"``/``"lycoris"``, ``"diffusers"`` or a registered format; detected when ``None``.
        base: base model (hub id or directory) used by formats whose module names need resolving.
        drop: with ``base``: globs naming the flattened (kohya/LyCORIS) names that may resolve to no module of
            the base (``"lora_te2_*"``, ``"status:unmatched"``); they are left out, and the adapter's metadata holds
            the coverage certificate under ``adaptkit.coverage`` (later operations carry those rows as
            ``dropped``). Without ``drop`` such names are an error. See docs/coverage.md.
        strict_drop: a ``drop`` glob that names no left-out name is an error (``False``: allowed, for operations
            that certify the adapter again, e.g. fuse).
        **options: passed to the format's reader.

    Returns:
        The adapter, with ``source`` set to its provenance (hub commit or absolute path).

    Raises:
        SourceNotFoundError: the source does not exist, holds no adapter, or holds several kohya
            candidates (name one as ``org/name:file.safetensors``). FormatError / ConfigError: it cannot
            be read.
    """
    select = functools.partial(_select_hub_files, format)
    resolved = resolve_selected(source, select, allow_patterns=allow_patterns(format))
    name = format_module(format).NAME if format else detect(resolved.path)
    if drop is not None and base is None:
        raise CoverageError("drop= (--drop) at load names module names that resolve to nothing in a base model; "
                            "pass base= (--base) too")
    if base is not None:
        options["base"] = base
    if drop is not None:
        options["drop"] = drop
    adapter = FORMATS[name].read(resolved.path, source=resolved.provenance, subfolder=resolved.subfolder, **options)
    if drop is not None and strict_drop:
        dropped = [LayerCoverage(p, None, "dropped", 0.0, 0) for p in _dropped_paths(adapter)]
        Certificate("load", str(base), tuple(dropped)).drop(drop)  # a glob that names nothing is an error
    return adapter


def to_format_namespace(adapter: Adapter, format: str, *, arch: str | None = None, base: Any = None,
                        drop: Sequence[str] | str | None = None, **options: Any) -> tuple[Adapter, tuple]:
    """The adapter with its diffusion-transformer layers in the namespace ``format`` writes (see :func:`save`), and
    the :class:`~adaptkit.formats.arch.remap.MapRow` of each mapped layer (empty when nothing moved)."""
    ns = namespace_of(format, **options)
    if ns is None:
        return adapter, ()
    # the layout narrows the architectures the paths are matched against (XLabs files exist for Flux.1 only)
    return to_namespace(adapter, ns, arch=arch, base=base, drop=drop, layout=format_module(format).NAME)


def _dropped_paths(adapter: Adapter) -> list[str]:
    prior = read_metadata(adapter.metadata) or {}
    return [r["path"] for r in prior.get("not_landing", ()) if r.get("status") == "dropped"]


def save(adapter: Adapter, path: str | os.PathLike, format: str = "peft", overwrite: bool = False, *,
         arch: str | None = None, base: Any = None, drop: Sequence[str] | str | None = None, **options: Any) -> Path:
    """Write an adapter in a format, atomically (nothing is left behind on error).

    Args:
        adapter: the adapter to write.
        path: output directory (PEFT, diffusers) or file (kohya ``.safetensors``).
        format: ``"peft"``, ``"kohya"``/``"lycoris"``, ``"diffusers"`` or a registered format.
        overwrite: replace an existing output.
        arch: the diffusion architecture (``"flux"``, ``"wan"`` ...; ``adaptkit.formats.arch.ARCHS``) whose module
            map moves the layers to the namespace the format writes (diffusers, PEFT: diffusers names; ``comfyui``:
            original names; kohya: as ``naming`` says); found from the adapter when ``None``.
        base: the diffusers model that sizes packed projections when they are split (default: the architecture's
            shipped inventory, or the sizes the layer itself implies).
        drop: globs naming layers no module map covers that may be left out (see docs/coverage.md).
        **options: writer options; kohya's ``naming``, and ``component`` for kohya and PEFT (see
            :func:`adaptkit.converters.kohya.write` and :func:`adaptkit.converters.peft.write`).

    Returns:
        The path written.

    Raises:
        ArgumentTypeError: ``adapter`` is not an :class:`~adaptkit.graph.Adapter`.
        OutputIsInputError: ``path`` is, contains or lies inside the adapter's own source.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        UnsupportedError: the format cannot store the adapter: its ``can_store`` / ``can_store_adapter`` give a
            reason (the message names the first refused layer and says what to do).
        ConfigError: a writer option the format does not have (``naming`` other than kohya, ``component``
            for diffusers), or an unknown ``component``.
    """
    if not isinstance(adapter, Adapter):
        raise ArgumentTypeError(
            f"save needs an Adapter, got {type(adapter).__name__}; load or build one first, "
            "e.g. ak.save(ak.load(SOURCE), OUT) or ak.save(ak.merge([...]), OUT)"
        )
    fmt = format_module(format)
    check_write_options(fmt.NAME, **options)
    check_output(path, overwrite, inputs=[adapter])
    adapter, _ = to_format_namespace(adapter, fmt.NAME, arch=arch, base=base, drop=drop, **options)
    check_storable(fmt.NAME, adapter, **options)
    return fmt.write(adapter, path, overwrite=overwrite, **options)


__all__ = ["ALIASES", "FORMATS", "adapter_subfolders", "check_storable", "check_write_options", "detect",
           "format_module", "load", "namespace_of", "refusals", "register_format", "save", "to_format_namespace"]
