"""Adapter kinds: one file per kind, and the ``KINDS`` table naming them.

Every kind is a frozen dataclass of tensors with ``kind``, ``shape``, ``rank``, ``alpha``, ``scale``,
``additive``, ``delta()`` (raises for IA3) and ``apply(weight, bias)``. Kinds are pure tensor math: no
``nn.Module`` is involved.
"""

from __future__ import annotations

from .base import cast_layer, layer_dtype, layer_is_finite, layer_nbytes, layer_numel, tensor_fields
from .full import Full
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

Layer = LoRA | LoHa | LoKr | IA3 | Full

KINDS: dict[str, type] = {
    "lora": LoRA,
    "loha": LoHa,
    "lokr": LoKr,
    "ia3": IA3,
    "full": Full,
}

__all__ = [
    "KINDS",
    "Full",
    "IA3",
    "Layer",
    "LoHa",
    "LoKr",
    "LoRA",
    "cast_layer",
    "layer_dtype",
    "layer_is_finite",
    "layer_nbytes",
    "layer_numel",
    "tensor_fields",
]
