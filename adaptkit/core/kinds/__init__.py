"""Adapter kinds: one file per kind, and the ``KINDS`` table naming them.

Every kind is a frozen dataclass of tensors with ``kind``, ``shape``, ``rank``, ``alpha``, ``scale``,
``additive``, ``delta()`` (raises for IA3) and ``apply(weight, bias)``. Kinds are pure tensor math: no
``nn.Module`` is involved.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import (
    cast_layer,
    layer_dtype,
    layer_is_finite,
    layer_nbytes,
    layer_numel,
    tensor_fields,
)
from .full import Full
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

Layer = LoRA | LoHa | LoKr | IA3 | Full

#: the one table of kinds: kind name -> layer class; :func:`register_kind` adds to it
KINDS: dict[str, type] = {
    "lora": LoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "ia3": IA3,
    "full": Full,
}


def register_kind(cls: type) -> type:
    """Add a layer class to :data:`KINDS` under its ``kind`` name (usable as a class decorator).

    The class implements the layer protocol of :mod:`adaptkit.core.kinds.base`; operations (fuse, merge,
    convert, status, analysis) then handle its layers without knowing the kind.

    Args:
        cls: the layer class; its ``kind`` attribute names it.

    Returns:
        The class, unchanged.

    Raises:
        ConfigError: the class has no ``kind`` name, or the name belongs to another class already.
    """
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} has no 'kind' name; set a class attribute kind = '...' before registering it")
    if KINDS.get(name, cls) is not cls:
        raise ConfigError(f"kind '{name}' is already registered by {KINDS[name].__name__}; choose another kind name")
    KINDS[name] = cls
    return cls

__all__ = [
    "IA3",
    "KINDS",
    "Full",
    "Layer",
    "LoHa",
    "LoKr",
    "LoRA",
    "cast_layer",
    "layer_dtype",
    "layer_is_finite",
    "layer_nbytes",
    "layer_numel",
    "register_kind",
    "tensor_fields",
]
