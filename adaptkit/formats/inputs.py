"""Inputs of the public functions: an :class:`~adaptkit.core.adapter.Adapter`, or a source to load once.

Every public function (``ak.merge``, ``ak.fuse``, ``ak.analyze``, ...) accepts adapters or sources (hub ids,
directories, files) and turns them into adapters here, once, at its entry; the operations below take
:class:`~adaptkit.core.adapter.Adapter` objects only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..core.adapter import Adapter
from ..errors import AdaptkitError, ConfigError
from . import load

#: what a public function accepts in place of an adapter
AdapterLike = Adapter | str | os.PathLike


def as_adapter(source: AdapterLike, *, against: Any = None, drop: Any = None, **load_options: Any) -> Adapter:
    """Return an :class:`Adapter` as it is, or load a source with :func:`adaptkit.load`.

    Args:
        source: an adapter, or a hub id / directory / file.
        against: a base model (hub id, directory, file) to resolve kohya/LyCORIS flattened names against, as
            fuse does: the base's module inventory decides what each name means. Names the base alone cannot
            resolve (sd-scripts' LDM UNet names against a diffusers UNet) are tried once more against the
            shipped inventories; when that fails too, the error is the one about the base.
        drop: the operation's drop globs: flattened names they name may resolve to nothing in the base (see
            :func:`adaptkit.load`); globs naming nothing at load are left for the operation's own certificate.
        **load_options: passed to :func:`adaptkit.load` (``format``, ``base``, ...).

    Returns:
        The adapter.

    Raises:
        SourceNotFoundError / FormatError / ConfigError: as :func:`adaptkit.load`.
    """
    if isinstance(source, Adapter):
        return source
    gate = {} if drop is None else {"drop": drop, "strict_drop": False}
    if against is None:
        return load(source, **load_options, **(gate if load_options.get("base") is not None else {}))
    try:
        return load(source, base=str(against), **load_options, **gate)
    except ConfigError as against_base:
        try:
            return load(source, **load_options)
        except AdaptkitError:
            raise against_base from None


def as_adapters(sources: AdapterLike | Sequence[AdapterLike], *, against: Any = None, drop: Any = None,
                **load_options: Any) -> list[Adapter]:
    """:func:`as_adapter` for one adapter or source, or a sequence of them; always a list."""
    if isinstance(sources, (Adapter, str, os.PathLike)):
        sources = [sources]
    return [as_adapter(s, against=against, drop=drop, **load_options) for s in sources]


__all__ = ["AdapterLike", "as_adapter", "as_adapters"]
