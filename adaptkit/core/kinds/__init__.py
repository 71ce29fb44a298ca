"""Adapter kinds: one file per kind, and the ``KINDS`` table naming them.

Every kind is a frozen dataclass of tensors implementing the :class:`~adaptkit.core.kinds.base.Layer`
protocol (delta, apply, apply_rows, fit, norms, factors, parts, conversion to LoRA, ...). Kinds are pure
tensor math: no ``nn.Module`` is involved. Operations use only the protocol, so a kind added with
:func:`register_kind` works in fuse, merge, convert, status and analysis.
"""

from __future__ import annotations

from ...errors import ConfigError
from .adalora import AdaLoRA
from .base import (
    Layer,
    cast_layer,
    layer_dtype,
    layer_is_finite,
    layer_nbytes,
    layer_numel,
    tensor_fields,
)
from .boft import BOFT
from .c3a import C3A
from .delora import DeLoRA
from .expert_lora import ExpertLoRA
from .fourierft import FourierFT
from .full import Full
from .glora import GLoRA
from .gralora import GraLoRA
from .hra import HRA
from .ia3 import IA3
from .ln_tuning import LNTuning
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .lycoris_oft import LycorisOFT
from .miss import MiSS, MiSSBat
from .oft import OFT
from .randlora import RandLoRA
from .replace import Replace
from .shira import SHiRA
from .trainable_tokens import TrainableTokens
from .vblora import VBLoRA
from .vera import VeRA
from .waveft import WaveFT

#: the one table of kinds: kind name -> layer class; :func:`register_kind` adds to it
KINDS: dict[str, type[Layer]] = {
    "lora": LoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "ia3": IA3,
    "full": Full,
    # additive, low rank (exact factors)
    "adalora": AdaLoRA,
    "vera": VeRA,
    "randlora": RandLoRA,
    "vblora": VBLoRA,
    "delora": DeLoRA,
    "gralora": GraLoRA,
    "miss": MiSS,
    "fourierft": FourierFT,
    # additive, dense
    "waveft": WaveFT,
    "shira": SHiRA,
    "c3a": C3A,
    # base-dependent (no base-free delta: apply with the base weight)
    "oft": OFT,
    "boft": BOFT,
    "hra": HRA,
    "miss_bat": MiSSBat,
    "lycoris_oft": LycorisOFT,
    "glora": GLoRA,
    "ln_tuning": LNTuning,
    "trainable_tokens": TrainableTokens,
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
    "BOFT",
    "C3A",
    "HRA",
    "IA3",
    "KINDS",
    "OFT",
    "AdaLoRA",
    "DeLoRA",
    "ExpertLoRA",
    "FourierFT",
    "Full",
    "GLoRA",
    "GraLoRA",
    "LNTuning",
    "Layer",
    "LoHa",
    "LoKr",
    "LoRA",
    "LycorisOFT",
    "MiSS",
    "MiSSBat",
    "RandLoRA",
    "Replace",
    "SHiRA",
    "TrainableTokens",
    "VBLoRA",
    "VeRA",
    "WaveFT",
    "cast_layer",
    "layer_dtype",
    "layer_is_finite",
    "layer_nbytes",
    "layer_numel",
    "register_kind",
    "tensor_fields",
]
