"""LoHa: ``dW = scale * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product of two low-rank matrices).

With Tucker cores (PEFT ``use_effective_conv2d`` / LyCORIS ``use_tucker``) each factor is rebuilt as
``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``, with ``w_a`` of shape ``(r, out)``.
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


def _rebuild(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return f32(wa) @ f32(wb)
    return torch.einsum("ij...,jr,ip->pr...", f32(t), f32(wb), f32(wa))


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class LoHa(DeltaMixin):
    """One LoHa layer (PEFT ``hada_*`` / LyCORIS ``hada_*`` tensors, same names in both)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float
    shape: tuple[int, ...]
    module_type: str = "linear"
    fan_in_fan_out: bool = False
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: int = 0

    kind: ClassVar[str] = "loha"
    reshapes_to_module: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_floating(self)
        if self.w1b.shape[0] == 0:
            raise ShapeMismatchError(f"LoHa factor w1_b has shape {tuple(self.w1b.shape)}: rank 0, so alpha / r is "
                                     "undefined; drop the layer or give it a positive rank")
        if self.w1b.shape[0] != self.w2b.shape[0] or (self.t1 is None) != (self.t2 is None):
            raise ShapeMismatchError(
                f"LoHa factors disagree: w1_b {tuple(self.w1b.shape)}, w2_b {tuple(self.w2b.shape)}; "
                "both halves need the same rank (and both or neither Tucker core)"
            )
        numel = math.prod(self.shape)
        built = math.prod(self._rebuilt_shape())
        if built != numel:
            raise ShapeMismatchError(
                f"LoHa factors build a {self._rebuilt_shape()} delta, which does not fit weight shape {tuple(self.shape)}"
            )

    def _rebuilt_shape(self) -> tuple[int, ...]:
        if self.t1 is None:
            return (self.w1a.shape[0], self.w1b.shape[1])
        return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])

    @property
    def rank(self) -> int:
        """The LoHa rank ``r`` (each half has rank r, the product up to r^2)."""
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        w = _rebuild(self.w1a, self.w1b, self.t1) * _rebuild(self.w2a, self.w2b, self.t2) * self.scale
        return w.reshape(math_shape(tuple(self.shape), self.fan_in_fan_out))

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Without Tucker cores ``(A_1 B_1) * (A_2 B_2) = U V`` exactly, at rank ``r^2``: ``U`` the row-wise
        Kronecker product of ``A_1, A_2`` (scale folded in) and ``V`` the column-wise Khatri-Rao product of
        ``B_1, B_2``. ``None`` with Tucker cores."""
        if self.t1 is not None:
            return None
        a1, b1 = self.w1a.to(dtype), self.w1b.to(dtype).reshape(self.w1b.shape[0], -1)
        a2, b2 = self.w2a.to(dtype), self.w2b.to(dtype).reshape(self.w2b.shape[0], -1)
        m, n = a1.shape[0], b1.shape[1]
        if (m, n) != (self._delta_rows(), math.prod(self.shape) // self._delta_rows()):
            return None
        u = (a1[:, :, None] * a2[:, None, :]).reshape(m, -1) * self.scale  # row-wise Kronecker product
        v = (b1[:, None, :] * b2[None, :, :]).reshape(-1, n)  # column-wise Khatri-Rao product
        return u, v

    def _delta_rows(self) -> int:
        return math_shape(tuple(self.shape), self.fan_in_fan_out)[0]

    def to_lora(self, rank: int | None) -> tuple[LoRA, float, float, str]:
        """A truncated SVD of the dense delta (see :func:`~adaptkit.core.kinds.lora.dense_to_lora`)."""
        return dense_to_lora(self, rank)
