"""The diffusion architectures adaptkit maps between original and diffusers names: the ``ARCHS`` table.

One module per architecture holds its :class:`~adaptkit.formats.arch.base.Arch` row (config, module map, the layouts
its adapters ship in). :func:`arch_of_model` recognises a diffusers model class; :mod:`.remap` moves adapters between
the namespaces; ``scripts/make_inventories.py`` builds each row's shipped inventory from its config.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import DIFFUSERS, ORIGINAL, Arch, Rule, original_listing
from .flux import FLUX
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO
from .ltx_video import LTX_VIDEO

ARCHS: dict[str, Arch] = {a.name: a for a in (FLUX, HUNYUAN_VIDEO, LTX_VIDEO, HIDREAM)}


def get_arch(name: str) -> Arch:
    """The architecture called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    key = name.lower().replace("-", "_").replace(".", "")
    if key not in ARCHS:
        raise ConfigError(f"unknown architecture '{name}'; known: {', '.join(ARCHS)}")
    return ARCHS[key]


def arch_of_model(model: Any) -> Arch | None:
    """The architecture of a diffusers model instance (by its class name), else ``None``."""
    name = type(model).__name__
    return next((a for a in ARCHS.values() if a.model_class == name), None)


def arch_of_class(class_name: str | None) -> Arch | None:
    """The architecture whose diffusers class is ``class_name`` (a ``config.json``'s ``_class_name``), else ``None``."""
    return next((a for a in ARCHS.values() if a.model_class == class_name), None)


__all__ = ["ARCHS", "DIFFUSERS", "ORIGINAL", "Arch", "Rule", "arch_of_class", "arch_of_model", "get_arch",
           "original_listing"]
