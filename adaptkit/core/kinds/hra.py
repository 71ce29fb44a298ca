"""HRA (PEFT): a chain of Householder reflections on the input features, ``W' = W_flat H`` (multiplicative).

PEFT (``tuners/hra``) stores ``hra_u (in, r)`` (``(in*kh*kw, r)`` for conv). Without Gram-Schmidt,
``H = prod_i (I - 2 u_i u_i^T)`` over the normalised columns in order ``0 .. r-1``; with ``apply_GS`` the
columns are orthonormalised first and ``H = I - 2 U U^T`` (this kind orthonormalises with a QR
decomposition: the signs QR picks do not change ``U U^T``). peft's ``get_delta_weight`` returns ``H`` itself
(:meth:`HRA.reflection`). Multiplicative: ``additive`` is False, ``delta()`` raises (use ``apply``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import check_floating, f32
from .basedep import BaseDependent, cached


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class HRA(BaseDependent):
    """One HRA layer.

    Args:
        u: ``hra_u`` ``(in * k, r)``.
        shape: module weight shape, or ``None`` until :meth:`fit` takes the base's (a PEFT file omits ``out``).
        apply_gs: the config's ``apply_GS``.
        module_type: ``"linear"`` or ``"conv"``.
    """

    u: torch.Tensor
    shape: tuple[int, ...] | None
    apply_gs: bool = False
    module_type: str = "linear"

    kind: ClassVar[str] = "hra"
    effect: ClassVar[str] = "reflects the input features of the base weight (multiplicative)"
    rowwise: ClassVar[bool] = True
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        if self.u.ndim != 2 or (self.shape is not None and self.u.shape[0] != math.prod(self.shape[1:])):
            raise ShapeMismatchError(f"HRA hra_u has shape {tuple(self.u.shape)}; for a weight of shape {tuple(self.shape)} "
                                     f"it must be (in * k, r)")

    @property
    def rank(self) -> int:
        """The number of reflections ``r``."""
        return int(self.u.shape[1])

    def reflection(self) -> torch.Tensor:
        """Float32 ``H`` (peft's ``get_delta_weight``)."""
        u = f32(self.u)
        eye = torch.eye(u.shape[0], dtype=torch.float32)
        if self.apply_gs:
            q = torch.linalg.qr(u).Q
            return eye - 2 * q @ q.T
        u = u / u.norm(dim=0)
        h = eye
        for i in range(self.rank):
            col = u[:, i:i + 1]
            h = h - 2 * (h @ col) @ col.T
        return h

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_flat H`` (float32)."""
        return self.apply_weight_rows(weight, 0, weight.shape[0], None)

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``W_flat H`` (``H`` prepared once per tensor)."""
        return (rows.reshape(rows.shape[0], -1) @ cached(cache, "reflection", self.reflection)).reshape(rows.shape)
