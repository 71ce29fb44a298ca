"""The diffusion architectures adaptkit maps between original and diffusers names: the ``ARCHS`` table.

One module per architecture holds its :class:`~adaptkit.formats.arch.base.Arch` row (config, module map, the layouts
its adapters ship in). :func:`arch_of_model` recognises a diffusers model class; :mod:`.remap` moves adapters between
the namespaces; ``scripts/make_inventories.py`` builds each row's shipped inventory from its config.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import DIFFUSERS, ORIGINAL, Arch, Rule, original_listing
from .chroma import CHROMA
from .flux import FLUX
from .flux2 import FLUX2
from .hidream import HIDREAM
from .hunyuan_video import HUNYUAN_VIDEO
from .ltx_video import LTX_VIDEO
from .lumina2 import LUMINA2
from .qwen_image import QWEN_IMAGE
from .sd3 import SD3, SD35_LARGE, SD35_MEDIUM
from .wan import WAN

ARCHS: dict[str, Arch] = {a.name: a for a in (FLUX, FLUX2, CHROMA, SD3, SD35_MEDIUM, SD35_LARGE, WAN, QWEN_IMAGE,
                                             LUMINA2, HUNYUAN_VIDEO, LTX_VIDEO, HIDREAM)}


def _key(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def get_arch(name: str) -> Arch:
    """The architecture called ``name`` or labelled so (``"flux"``, ``"Flux.1"``, ``"wan"``, ``"Wan 2.x"``);
    :class:`ConfigError` listing the known ones otherwise."""
    key = _key(name)
    for arch in ARCHS.values():
        if key in (_key(arch.name), _key(arch.label)):
            return arch
    raise ConfigError(f"unknown architecture '{name}'; known: {', '.join(ARCHS)}")


def arch_of_model(model: Any) -> Arch | None:
    """The architecture of a diffusers model instance (by its class name and config), else ``None``."""
    return arch_of_class(type(model).__name__, getattr(model, "config", None))


def arch_of_class(class_name: str | None, config: Any = None) -> Arch | None:
    """The architecture whose diffusers class is ``class_name`` (a ``config.json``'s ``_class_name``), else ``None``.

    Several rows of one class (SD3-medium, SD3.5-medium, SD3.5-large) are told apart by ``config``: the row whose
    ``num_layers`` and then most other entries agree with it wins (the first row of the class without a config)."""
    rows = [a for a in ARCHS.values() if a.model_class == class_name]
    if len(rows) < 2 or not config:
        return rows[0] if rows else None

    def _same(a: Any, b: Any) -> bool:
        return (tuple(a) if isinstance(a, list | tuple) else a) == (tuple(b) if isinstance(b, list | tuple) else b)

    def score(arch: Arch) -> tuple[bool, int]:
        agree = sum(k in config and _same(config[k], v) for k, v in arch.config.items())
        return "num_layers" in config and _same(config["num_layers"], arch.config.get("num_layers")), agree

    return max(rows, key=score)  # max keeps the first of equal scores


__all__ = ["ARCHS", "DIFFUSERS", "ORIGINAL", "Arch", "Rule", "arch_of_class", "arch_of_model", "get_arch",
           "original_listing"]
