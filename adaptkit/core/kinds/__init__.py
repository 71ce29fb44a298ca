"""Adapter kinds: one file per kind, and the ``KINDS`` table naming them.

Every kind is a frozen dataclass of tensors implementing the :class:`~adaptkit.core.kinds.base.Layer`
protocol (delta, apply, apply_rows, fit, norms, factors, parts, conversion to LoRA, ...). Kinds are pure
tensor math: no ``nn.Module`` is involved. Operations use only the protocol, so a kind added with
:func:`register_kind` works in fuse, merge, convert, status and analysis.
"""

from __future__ import annotations

from ...errors import ConfigError
from .base import (
    Layer,
    cast_layer,
    layer_dtype,
    layer_is_finite,
    layer_nbytes,
    layer_numel,
    tensor_fields,
)
from .expert_lora import ExpertLoRA
from .full import Full
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .replace import Replace

#: the one table of kinds: kind name -> layer class; :func:`register_kind` adds to it
KINDS: dict[str, type[Layer]] = {
    "lora": LoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "ia3": IA3,
    "full": Full,
    "expert_lora": ExpertLoRA,
}


#: the protocol members a registered class must define (attributes may be dataclass fields, checked on instances)
PROTOCOL_METHODS = tuple(sorted(
    name for name, value in vars(Layer).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, (classmethod, property)))
    and name not in ("rank", "alpha", "scale", "additive", "has_delta", "changes_bias", "rowwise", "dora")
))


def register_kind(cls: type) -> type:
    """Add a layer class to :data:`KINDS` under its ``kind`` name (usable as a class decorator).

    The class implements the :class:`~adaptkit.core.kinds.base.Layer` protocol (subclassing
    :class:`~adaptkit.core.kinds.common.DeltaMixin` gives most of it from ``delta_math()``); operations (fuse,
    merge, convert, status, analysis) then handle its layers without knowing the kind.

    Args:
        cls: the layer class; its ``kind`` attribute names it.

    Returns:
        The class, unchanged.

    Raises:
        ConfigError: the class has no ``kind`` name, lacks protocol methods (they are named), or the name
            belongs to another class already.
    """
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} has no 'kind' name; set a class attribute kind = '...' before registering it")
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(f"{cls.__name__} lacks the layer protocol methods {', '.join(missing)}; implement them or "
                          "subclass adaptkit.core.kinds.common.DeltaMixin, which derives most from delta_math()")
    if KINDS.get(name, cls) is not cls:
        raise ConfigError(f"kind '{name}' is already registered by {KINDS[name].__name__}; choose another kind name")
    KINDS[name] = cls
    return cls


__all__ = [
    "IA3",
    "KINDS",
    "ExpertLoRA",
    "Full",
    "Layer",
    "LoHa",
    "LoKr",
    "LoRA",
    "Replace",
    "cast_layer",
    "layer_dtype",
    "layer_is_finite",
    "layer_nbytes",
    "layer_numel",
    "register_kind",
    "tensor_fields",
]
