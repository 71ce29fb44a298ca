"""Registering extensions in one call: a kind together with its names in the checkpoint formats.

``core`` must not import ``formats``, so the composition lives here: :func:`register_kind` adds a layer
class to :data:`adaptkit.core.kinds.KINDS` and, given ``peft=``, its PEFT key names to
:data:`adaptkit.formats.peft_layers.PEFT_NAMES`, after which PEFT files and state dicts with those keys load
(``cls.from_parts``) and save (``layer.parts()``) without any other change to the library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .core.kinds import register_kind as _register_kind_class
from .formats.peft_layers import register_peft_names
from .formats.registry import register_format


def register_kind(cls: type, *, peft: Mapping[str, Any] | None = None) -> type:
    """Register a layer class as a kind, and optionally its PEFT names (usable as a class decorator).

    Args:
        cls: the layer class; its ``kind`` attribute names it (see :func:`adaptkit.core.kinds.register_kind`).
        peft: the keyword arguments of :func:`adaptkit.formats.peft_layers.register_peft_names` (``peft_type``,
            ``parts``, ``settings``), e.g. ``{"peft_type": "TOY", "parts": {"toy_s": "s"}}``; the class then
            implements ``parts()`` and the classmethod ``from_parts(parts, *, shape, settings)``.

    Returns:
        The class, unchanged.

    Raises:
        ConfigError: the kind name is taken, or the PEFT names clash with another kind's.
    """
    _register_kind_class(cls)
    if peft is not None:
        register_peft_names(cls.kind, **dict(peft))
    return cls


__all__ = ["register_format", "register_kind", "register_peft_names"]
