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
from .base import check_floating, f32, math_shape
from .common import DeltaMixin
from .lora import LoRA, dense_to_lora


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
    reshapes_to_module: ClassVar[bool] = True

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

    def to_lora(self, rank: int | None) -> tuple[LoRA, float, float, str]:
        """A truncated SVD of the dense delta (see :func:`~adaptkit.core.kinds.lora.dense_to_lora`)."""
        return dense_to_lora(self, rank)

    def _kron_2d(self) -> bool:
        """True when the delta is exactly ``scale * kron(W_1, W_2)`` of two matrices (no reshape, no Tucker core)."""
        if self.t2 is not None or len(self.w2_shape) != 2:
            return False
        (a, c), (b, d) = self.w1_shape, self.w2_shape
        return math_shape(tuple(self.shape), self.fan_in_fan_out) == (a * b, c * d)

    def _kron_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.w1.double() if self.w1 is not None else self.w1a.double() @ self.w1b.double()
        w2 = self.w2.double() if self.w2 is not None else self.w2a.double() @ self.w2b.double()
        return w1, w2

    def spectrum(self) -> tuple[torch.Tensor, str]:
        """The singular values of ``kron(W_1, W_2)`` are the products of those of ``W_1`` and ``W_2``."""
        if not self._kron_2d():
            return super().spectrum()
        w1, w2 = self._kron_factors()
        s1, s2 = torch.linalg.svdvals(w1).double(), torch.linalg.svdvals(w2).double()
        return torch.sort(torch.outer(s1, s2).flatten() * abs(self.scale), descending=True).values, "kron"

    def sparsity(self) -> float:
        """A Kronecker entry is zero when either factor entry is (counted without building the delta)."""
        if not self._kron_2d():
            return super().sparsity()
        if self.scale == 0:
            return 1.0
        w1, w2 = self._kron_factors()
        return 1.0 - (int((w1 != 0).sum()) / w1.numel()) * (int((w2 != 0).sum()) / w2.numel())
