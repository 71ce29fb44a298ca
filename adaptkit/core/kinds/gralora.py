"""GraLoRA: ``k x k`` grid of block LoRAs that exchange rank slices, plus an optional plain "hybrid" LoRA.

PEFT (``tuners/gralora``): ``gralora_A (k, in / k, r)`` and ``gralora_B (k, r, out / k)``; the rank ``r`` is
split into ``k`` slices of ``s = r / k``. Output block ``a`` / input block ``n`` of the delta is
``B[a][n*s:(n+1)*s]^T @ A[n][:, a*s:(a+1)*s]^T``: input block ``n`` feeds rank slice ``a`` of its ``A`` into
slice ``n`` of output block ``a``'s ``B`` (peft builds the same matrix with a scatter and an einsum). With
``hybrid_r > 0`` a plain LoRA ``gralora_B_general.weight @ gralora_A_general.weight`` is added. The whole is
scaled by ``alpha / (r + hybrid_r)``; ``Conv1D`` through ``fan_in_fan_out``. The dense delta has rank up to
``k * r``: :meth:`GraLoRA.factors` gives it exactly as ``U V`` with block-sparse factors of rank
``k * r + hybrid_r`` (one rank slice per (output block, input block) pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class GraLoRA(AdditiveKind):
    """One GraLoRA layer.

    Args:
        a: ``gralora_A`` ``(k, in / k, r)``.
        b: ``gralora_B`` ``(k, r, out / k)``.
        alpha: the config's ``alpha``.
        shape: module weight shape (module orientation).
        a_general: ``gralora_A_general.weight`` ``(hybrid_r, in)`` or ``None``.
        b_general: ``gralora_B_general.weight`` ``(out, hybrid_r)`` or ``None``.
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    shape: tuple[int, ...]
    a_general: torch.Tensor | None = None
    b_general: torch.Tensor | None = None
    fan_in_fan_out: bool = False
    module_type: str = "linear"

    kind: ClassVar[str] = "gralora"

    def __post_init__(self) -> None:
        check_floating(self)
        out, inp = math_shape(tuple(self.shape), self.fan_in_fan_out)
        k = self.a.shape[0] if self.a.ndim == 3 else 0
        ok = (self.a.ndim == 3 and self.b.ndim == 3 and self.b.shape[0] == k and self.a.shape[2] == self.b.shape[1]
              and self.a.shape[1] * k == inp and self.b.shape[2] * k == out and self.a.shape[2] % k == 0)
        if (self.a_general is None) != (self.b_general is None):
            ok = False
        elif self.a_general is not None:
            ok = ok and (self.a_general.shape[1] == inp and self.b_general.shape[0] == out
                         and self.a_general.shape[0] == self.b_general.shape[1])
        if not ok:
            raise ShapeMismatchError(
                f"GraLoRA tensors gralora_A {tuple(self.a.shape)} / gralora_B {tuple(self.b.shape)} (hybrid "
                f"{None if self.a_general is None else tuple(self.a_general.shape)}) do not fit a weight of shape "
                f"{tuple(self.shape)}; A is (k, in/k, r), B is (k, r, out/k) with r divisible by k"
            )

    @property
    def k(self) -> int:
        """The grid size ``gralora_k``."""
        return int(self.a.shape[0])

    @property
    def hybrid_rank(self) -> int:
        """``hybrid_r`` (0 without the plain LoRA part)."""
        return 0 if self.a_general is None else int(self.a_general.shape[0])

    @property
    def rank(self) -> int:
        """``r`` (the block rank; the update has rank up to ``k * r + hybrid_r``)."""
        return int(self.a.shape[2])

    @property
    def scale(self) -> float:
        """``alpha / (r + hybrid_r)``."""
        return self.alpha / (self.rank + self.hybrid_rank)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype``, rank ``k * r + hybrid_r`` (exact, the scale folded into ``U``).

        Column ``(a, n, t)`` of ``U`` is rank ``t`` of slice ``n`` of output block ``a``'s ``B`` (zero outside block
        ``a``); row ``(a, n, t)`` of ``V`` is rank ``t`` of slice ``a`` of input block ``n``'s ``A`` (zero outside
        block ``n``); the hybrid LoRA's factors are appended.
        """
        k, s = self.k, self.rank // self.k
        a4 = self.a.to(dtype).reshape(k, self.a.shape[1], k, s)  # [n, i, a, t]
        b4 = self.b.to(dtype).reshape(k, k, s, self.b.shape[2])  # [a, n, t, o]
        eye = torch.eye(k, dtype=dtype)
        u = torch.einsum("ac,anto->aocnt", eye, b4).reshape(k * self.b.shape[2], k * k * s)
        v = torch.einsum("nm,niat->antmi", eye, a4).reshape(k * k * s, k * self.a.shape[1])
        if self.a_general is not None:
            u = torch.cat([u, self.b_general.to(dtype)], dim=1)
            v = torch.cat([v, self.a_general.to(dtype)], dim=0)
        return u * self.scale, v

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        k, s = self.k, self.rank // self.k
        a4 = f32(self.a).reshape(k, self.a.shape[1], k, s)  # [n, i, a, t]
        b4 = f32(self.b).reshape(k, k, s, self.b.shape[2])  # [a, n, t, o]
        d = torch.einsum("niat,anto->aoni", a4, b4).reshape(k * self.b.shape[2], k * self.a.shape[1])
        if self.a_general is not None:
            d = d + f32(self.b_general) @ f32(self.a_general)
        return d * self.scale
