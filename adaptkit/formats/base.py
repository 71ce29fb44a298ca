"""The ``Format`` protocol every checkpoint format implements, and what the formats share.

A format is a module (``peft``, ``kohya``, ``diffusers``) or any object with the same surface, listed in
:data:`adaptkit.formats.FORMATS` (:func:`adaptkit.formats.register_format` adds one). It declares what it
stores, and everything outside ``formats/`` asks it instead of keeping its own tables:

* ``NAME`` / ``LABEL``: the name users type and the name messages print; ``LOOKED_FOR``: what a folder must
  hold to be one (for "no adapter found" messages); ``ALLOW_PATTERNS``: its files as patterns (offline hub
  access); ``WRITE_OPTIONS``: the writer options it has (``naming``, ``component``).
* ``detect(path)`` / ``detect_keys(keys)``: whether a local path, or a set of tensor names, is in this format.
* ``select_files(listing, named)``: which files of a (hub) folder listing make up one adapter.
* ``read_tensors(tensors, metadata, config, *, source)``: an :class:`~adaptkit.core.adapter.Adapter` from
  tensors in memory; ``read(path)`` finds the files, reads them and calls it.
* ``can_store(layer, module)`` / ``can_store_adapter(adapter)``: why the format cannot hold a layer (or a part
  of an adapter: one PEFT type per file, DoRA on all layers or none, extra tensors), ``None``/``{}`` when it can.
  These are what converting layers to LoRA may fix, so convert's planning asks them.
* ``can_name(module)``: why the format has no name for a module path (diffusers: outside a pipeline component),
  ``None`` when it has one; no conversion fixes that.
* ``kind_support()`` (optional): the kinds it reads and writes, ``{kind: KindSupport}``, from its own tables; the
  capability table of ``docs/formats.md`` (:mod:`adaptkit.capabilities`) is built from it.
* ``check_options(**options)``: refuse bad values of its own writer options.
* ``write(adapter, path, *, overwrite, **options)``: write an adapter whose refusals are empty; the writer
  trusts that and does not decide again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError, FormatError, UnsupportedError
from ..io.safetensors import read_safetensors_header


@dataclass(frozen=True)
class Selection:
    """The files of one adapter in a folder listing.

    Args:
        files: file names (relative to the folder) to download.
        read: the file to read, or ``None`` to read the folder.
    """

    files: tuple[str, ...]
    read: str | None = None


@dataclass(frozen=True)
class KindSupport:
    """What a format does with one kind, as its tables declare it (a format's ``kind_support()`` values).

    Args:
        read: the reader builds layers of the kind.
        write: the writer stores layers of the kind.
        limited: some layers of the kind are refused all the same (``can_store`` names why: DoRA per input,
            Conv1D, a LoRA bias ...).
    """

    read: bool
    write: bool
    limited: bool = False


class AmbiguousSelection(Exception):
    """Raised by ``select_files`` when a folder holds several candidate adapter files of the format."""

    def __init__(self, candidates: Sequence[str]) -> None:
        super().__init__(", ".join(candidates))
        self.candidates = list(candidates)


@runtime_checkable
class Format(Protocol):
    """What :data:`adaptkit.formats.FORMATS` holds: one checkpoint format (see the module docstring)."""

    NAME: str
    LABEL: str
    LOOKED_FOR: str
    ALLOW_PATTERNS: Sequence[str]
    WRITE_OPTIONS: tuple[str, ...]

    def detect(self, path: Path) -> bool: ...

    def detect_keys(self, keys: Collection[str]) -> bool: ...

    def select_files(self, listing: Sequence[str], named: str | None = None) -> Selection | None: ...

    def is_adapter_file(self, name: str) -> bool: ...

    def read_tensors(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     config: Mapping[str, Any] | None = None, *, source: str | None = None,
                     **options: Any) -> Adapter: ...

    def read(self, path: Path, *, source: str | None = None, **options: Any) -> Adapter: ...

    def can_store(self, layer: Any, module: str) -> str | None: ...

    def can_name(self, module: str) -> str | None: ...

    def can_store_adapter(self, adapter: Adapter, **options: Any) -> dict[str, str]: ...

    def check_options(self, **options: Any) -> None: ...

    def write(self, adapter: Adapter, path: str | os.PathLike, *, overwrite: bool = False, **options: Any) -> Path: ...


#: the members a format must have, for :func:`missing_members`
MEMBERS = ("NAME", "LABEL", "LOOKED_FOR", "ALLOW_PATTERNS", "WRITE_OPTIONS", "detect", "detect_keys", "select_files",
           "is_adapter_file", "read_tensors", "read", "can_store", "can_name", "can_store_adapter", "check_options", "write")


def missing_members(fmt: Any) -> list[str]:
    """The members of :class:`Format` that ``fmt`` lacks (empty for a complete format)."""
    return [m for m in MEMBERS if not hasattr(fmt, m)]


#: full-model weights that sit beside adapters in some repos: never an adapter candidate
MODEL_WEIGHTS = re.compile(
    r"^(?:(?:model|pytorch_model|diffusion_pytorch_model|consolidated)(?:\.fp16|\.bf16)?|.+-\d{5}-of-\d{5})\.safetensors$"
)


def single_file(path: Path, *, strict: bool = False) -> Path | None:
    """The one ``.safetensors`` adapter file of a path: the path itself, or the only one in a directory (that holds
    no ``*.json`` config). ``None`` when there is none (``strict``: :class:`FormatError` naming the count)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1 or (not strict and any(path.glob("*.json"))):
            if strict:
                raise FormatError(f"{path} holds {len(files)} .safetensors files; pass the adapter file itself")
            return None
        path = files[0]
    return path if path.is_file() and path.suffix == ".safetensors" else None


def detect_file(path: Path, detect_keys: Any) -> bool:
    """Whether ``path`` is (or a directory holds just) one ``.safetensors`` file whose keys ``detect_keys`` accepts;
    only the header is read."""
    f = single_file(path)
    if f is None:
        return False
    header, _ = read_safetensors_header(f)
    return bool(detect_keys(header))


def is_model_weights(name: str) -> bool:
    """Whether a file name is a model's weights (``model.safetensors``, ``...-00001-of-00002.safetensors``)."""
    return bool(MODEL_WEIGHTS.match(name))


def refusals(fmt: Format, adapter: Adapter, *, paths: bool = True, **options: Any) -> dict[str, str]:
    """Why ``fmt`` cannot store parts of ``adapter``: ``{layer path or extra tensor name: reason}``.

    Module paths the format has no name for (:meth:`Format.can_name`, unless ``paths`` is false) and per-layer
    reasons (:meth:`Format.can_store`) come first; the adapter-level limits (:meth:`Format.can_store_adapter`,
    given the writer ``options``) are asked about the layers that passed them.
    """
    reasons = {p: why for p in adapter.layers if paths and (why := fmt.can_name(p)) is not None}
    reasons.update({p: why for p, layer in adapter.layers.items()
                    if p not in reasons and (why := fmt.can_store(layer, p)) is not None})
    rest = adapter.replace(layers={p: l for p, l in adapter.layers.items() if p not in reasons})
    reasons.update({k: v for k, v in fmt.can_store_adapter(rest, **options).items() if k not in reasons})
    return reasons


def check_choice(value: str | None, choices: Sequence[str], what: str) -> str | None:
    """Validate a writer option that takes one of ``choices`` or ``None`` (``what`` names it in the message).

    Raises:
        ConfigError: ``value`` is not ``None`` and not one of ``choices``.
    """
    if value is not None and value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


def check_storable(fmt: Format, adapter: Adapter, alternatives: Iterable[Format] = (), **options: Any) -> None:
    """Refuse an adapter ``fmt`` cannot store, with the format's own reasons, before anything is written.

    Args:
        fmt: the target format.
        adapter: the adapter to write.
        alternatives: other formats; the first that stores the whole adapter is suggested.
        **options: the writer options (PEFT's ``component`` decides which layers share one config).

    Raises:
        UnsupportedError: the adapter has no layers, or :func:`refusals` is not empty (the message names the
            first refused layer or tensor and why, and suggests another format or a conversion).
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    reasons = refusals(fmt, adapter, **options)
    if not reasons:
        return
    first = next(iter(reasons))
    # the adapter's own format first: a file converted to fmt and refused goes back where it came from
    ordered = sorted(alternatives, key=lambda f: f.NAME != adapter.format)
    other = next((f.NAME for f in ordered if f.NAME != fmt.NAME and not refusals(f, adapter)), None)
    write = f"write format='{other}'" if other else "write another format"
    if first not in adapter.layers:
        fix = f"{write} to keep it, or drop it from the adapter's extras"
    elif fmt.can_name(first) is not None:
        fix = write
    else:
        fix = f"{write}, or convert the layers first (convert(kind='lora', rank=R)) or fuse the adapter"
    raise UnsupportedError(
        f"{fmt.LABEL} cannot store {len(reasons)} part(s) of this adapter, e.g. {first} ({reasons[first]}); {fix}"
    )


__all__ = [
    "MEMBERS",
    "MODEL_WEIGHTS",
    "AmbiguousSelection",
    "Format",
    "KindSupport",
    "Selection",
    "check_choice",
    "check_storable",
    "is_model_weights",
    "missing_members",
    "refusals",
]
