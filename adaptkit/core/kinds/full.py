"""Full: a dense weight difference (LyCORIS ``diff`` / ``diff_b``, also norm layers' ``w_norm``/``b_norm``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import Layer, check_floating, f32
from .common import DeltaMixin
from .lora import LoRA, dense_to_lora


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class Full(DeltaMixin):
    """A dense difference ``dW`` (module orientation) and optional bias difference.

    Args:
        diff: the weight difference, shape ``shape``.
        shape: module weight shape.
        diff_b: bias difference or ``None``.
        module_type: ``"linear"``, ``"conv"``, ``"embedding"`` or ``"norm"``.
    """

    diff: torch.Tensor
    shape: tuple[int, ...]
    diff_b: torch.Tensor | None = None
    module_type: str = "linear"

    kind: ClassVar[str] = "full"
    fan_in_fan_out: ClassVar[bool] = False
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0
    any_module: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_floating(self)
        if tuple(self.diff.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"full diff has shape {tuple(self.diff.shape)}, expected {tuple(self.shape)}")

    def delta_math(self) -> torch.Tensor:
        """The difference in float32."""
        return f32(self.diff)

    def delta_bias(self) -> torch.Tensor | None:
        """The bias difference in float32, or ``None``."""
        return None if self.diff_b is None else f32(self.diff_b)

    def _transposed(self, shape: tuple[int, ...]) -> Layer:
        """A dense difference for the transposed weight is the transposed difference."""
        return dataclasses.replace(self, diff=self.diff.T, shape=shape)

    def lora_obstacle(self) -> str | None:
        """Norm-layer and embedding differences are not turned into LoRA."""
        if self.module_type == "norm" or len(self.shape) < 2:
            return "a norm-layer difference has no low-rank form"
        if self.module_type == "embedding":
            return "an embedding difference is not converted to an embedding LoRA"
        return None

    def to_lora(self, rank: int | None) -> tuple[LoRA, float, float, str]:
        """A truncated SVD of the difference; ``diff_b`` becomes the LoRA bias (scale 1)."""
        return dense_to_lora(self, rank)
