"""Replace: a whole tensor carried by an adapter in place of the base's (PEFT ``modules_to_save``, saved embeddings).

It is not stored as an adapter layer (a checkpoint keeps such tensors in ``Adapter.extras``), so it is not in
:data:`~adaptkit.core.kinds.KINDS`; fuse turns each extra into one to apply it like any other layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import UnsupportedError
from .base import Layer, check_floating, f32
from .basedep import NoBaseFreeDelta


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class Replace(NoBaseFreeDelta):
    """A replacement tensor: ``apply(W) = value``.

    Args:
        value: the new tensor (any shape with as many entries as the tensor it replaces).
        shape: the replaced tensor's shape, or ``None`` (taken from the tensor at ``apply``).
    """

    value: torch.Tensor
    shape: tuple[int, ...] | None = None

    kind: ClassVar[str] = "replace"
    additive: ClassVar[bool] = False
    has_delta: ClassVar[bool] = False
    changes_bias: ClassVar[bool] = False
    dora: ClassVar[bool] = False
    fan_in_fan_out: ClassVar[bool] = False
    module_type: ClassVar[str] = "linear"
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)

    def _no_delta_message(self) -> str:
        return "a replacement tensor has no delta without the base tensor; use apply(W)"

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(value, bias)`` in float32, ``value`` in the shape of ``weight``."""
        return f32(self.value).reshape(weight.shape).clone(), self.apply_bias(bias)

    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias is left as it is."""
        return None if bias is None else f32(bias)

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A replaced tensor cannot be restored; always raises :class:`UnsupportedError`."""
        raise UnsupportedError("a replaced tensor cannot be restored from the replacement; keep the original instead")

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """Fits any tensor with as many entries."""
        if math.prod(self.value.shape) != math.prod(shape):
            raise UnsupportedError(f"a replacement of shape {tuple(self.value.shape)} does not fit a tensor {tuple(shape)}")
        return self

    def note(self) -> str:
        """What the layer does."""
        return "replaces the whole tensor"

    def lora_obstacle(self) -> str:
        """A replacement depends on nothing low-rank."""
        return "it replaces the whole tensor, which has no LoRA form"

    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """Always raises :class:`UnsupportedError`."""
        raise UnsupportedError(f"a replacement cannot become LoRA: {self.lora_obstacle()}")
