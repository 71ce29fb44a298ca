"""LoKr: ``dW = scale * kron(w1, w2)``, each factor full or low rank (``w_a @ w_b``), ``w2`` optionally Tucker.

``rank`` is the nominal ``r`` the scale divides by: PEFT always uses ``alpha / r`` (even when both factors
are full); LyCORIS uses scale 1 when both factors are full, which a reader records as ``alpha == rank``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import DeltaMixin, check_floating, f32, math_shape


def _factor(w: torch.Tensor | None, wa: torch.Tensor | None, wb: torch.Tensor | None, t: torch.Tensor | None = None):
    if w is not None:
        return f32(w)
    if wa is None or wb is None:
        raise ShapeMismatchError("a LoKr factor needs either a full matrix or both of its a/b halves")
    if t is None:
        return f32(wa) @ f32(wb)
    return torch.einsum("ij...,ip,jr->pr...", f32(t), f32(wa), f32(wb))


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class LoKr(DeltaMixin):
    """One LoKr layer (``lokr_w1`` | ``lokr_w1_a/b``, ``lokr_w2`` | ``lokr_w2_a/b`` [+ ``lokr_t2``])."""

    alpha: float
    rank: int
    shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    module_type: str = "linear"
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    magnitude_axis: int = 0

    kind: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        check_floating(self)
        if (self.w1 is None) == (self.w1a is None and self.w1b is None) or (self.w1 is None and (self.w1a is None or self.w1b is None)):
            raise ShapeMismatchError("LoKr w1 must be given either as lokr_w1 or as lokr_w1_a + lokr_w1_b, not both or neither")
        if (self.w2 is None) == (self.w2a is None and self.w2b is None) or (self.w2 is None and (self.w2a is None or self.w2b is None)):
            raise ShapeMismatchError("LoKr w2 must be given either as lokr_w2 or as lokr_w2_a + lokr_w2_b, not both or neither")
        if self.w1a is not None and self.w1a.shape[1] != self.w1b.shape[0]:
            raise ShapeMismatchError(f"LoKr w1_a {tuple(self.w1a.shape)} and w1_b {tuple(self.w1b.shape)} disagree on the rank")
        if self.w2a is not None and self.t2 is None and self.w2a.shape[1] != self.w2b.shape[0]:
            raise ShapeMismatchError(f"LoKr w2_a {tuple(self.w2a.shape)} and w2_b {tuple(self.w2b.shape)} disagree on the rank")
        if self.rank <= 0:
            raise ShapeMismatchError(f"LoKr rank must be positive, got {self.rank}")
        a, c = self.w1_shape
        w2s = self.w2_shape
        built = a * w2s[0] * c * math.prod(w2s[1:])
        if built != math.prod(self.shape):
            raise ShapeMismatchError(
                f"LoKr factors w1 {(a, c)} x w2 {w2s} do not fit weight shape {tuple(self.shape)}"
            )

    @property
    def w1_shape(self) -> tuple[int, int]:
        """Shape of the (rebuilt) first Kronecker factor."""
        if self.w1 is not None:
            return (int(self.w1.shape[0]), int(self.w1.shape[1]))
        return (int(self.w1a.shape[0]), int(self.w1b.shape[1]))

    @property
    def w2_shape(self) -> tuple[int, ...]:
        """Shape of the (rebuilt) second Kronecker factor."""
        if self.w2 is not None:
            return tuple(int(s) for s in self.w2.shape)
        if self.t2 is not None:
            return (int(self.w2a.shape[1]), int(self.w2b.shape[1]), *(int(s) for s in self.t2.shape[2:]))
        return (int(self.w2a.shape[0]), int(self.w2b.shape[1]))

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        w1 = _factor(self.w1, self.w1a, self.w1b)
        w2 = _factor(self.w2, self.w2a, self.w2b, self.t2).contiguous()
        while w1.ndim < w2.ndim:
            w1 = w1.unsqueeze(-1)
        w = torch.kron(w1, w2) * self.scale
        return w.reshape(math_shape(tuple(self.shape), self.fan_in_fan_out))
