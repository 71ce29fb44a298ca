"""Full: a dense weight difference (LyCORIS ``diff`` / ``diff_b``, also norm layers' ``w_norm``/``b_norm``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import DeltaMixin, check_floating, f32


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
