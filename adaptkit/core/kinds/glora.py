"""GLoRA (LyCORIS): ``W' = W + scale * (W @ A + B)`` with low-rank ``A = a1 @ a2`` and ``B = b1 @ b2`` (base-dependent).

LyCORIS 4.1 (``lycoris/modules/glora.py``) stores ``a1.weight``, ``a2.weight``, ``b1.weight``, ``b2.weight``,
optionally ``bm.weight`` (a Tucker core for the ``B`` half of a conv) and ``alpha``. Gotchas:

* Shapes follow the ``nn.Linear``/``nn.ConvNd`` modules they come from: ``a2 (r, in)`` and ``a1 (in, r)`` (so
  ``A = a1 @ a2`` is ``in x in``, applied on the *input* side of ``W``), ``b2 (r, in[, *k])``, ``b1 (out, r)``;
  conv ``a1``/``a2`` are 1x1 (``(in, r, 1, 1)`` / ``(r, in, 1, 1)``) and ``W @ A`` contracts the input-channel
  axis of every kernel tap.
* ``scale = alpha / r`` with ``r = a2.shape[0]``; ``alpha`` 0 or missing means ``alpha = r`` (scale 1).
  ``rs_lora`` is not saved in the file, so a file is read as without it.
* The ``W @ A`` term makes the change depend on the base weight: ``additive`` is False and ``delta()``
  raises (use ``apply``). The ``B`` half alone is an ordinary LoRA (:meth:`GLoRA.b_delta`).
* With ``bm``: ``B = einsum("m n ..., i m, n j -> i j ...", bm, b1, b2)`` for 1x1 ``b1``/``b2``. LyCORIS 4.1
  itself never creates ``bm`` (its ``use_tucker`` is reduced to "all kernel sizes are 1" and the Tucker
  branch then requires a size that is not 1), not even in ``make_module_from_state_dict``; files from older
  versions can hold it, and the math is LyCORIS's functional ``_glora_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import check_floating, f32
from .basedep import BaseDependent, cached


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class GLoRA(BaseDependent):
    """One LyCORIS GLoRA layer.

    Args:
        a1: ``a1.weight`` ``(in, r[, 1, 1])``.
        a2: ``a2.weight`` ``(r, in[, 1, 1])``.
        b1: ``b1.weight`` ``(out, r[, 1, 1])``.
        b2: ``b2.weight`` ``(r, in[, *k])``.
        alpha: the stored ``alpha`` (0: ``r``).
        shape: module weight shape.
        bm: ``bm.weight`` ``(r, r, *k)`` Tucker core, or ``None``.
        module_type: ``"linear"`` or ``"conv"``.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: float
    shape: tuple[int, ...]
    bm: torch.Tensor | None = None
    module_type: str = "linear"

    kind: ClassVar[str] = "glora"
    effect: ClassVar[str] = "adds W·A, a low-rank map of the base weight's input side, to a LoRA update"
    rowwise: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_floating(self)
        out, inp = int(self.shape[0]), int(self.shape[1])
        r = int(self.a2.shape[0])
        ok = (self.a1.shape[:2] == (inp, r) and self.a2.shape[1] == inp and self.b1.shape[:2] == (out, self.b2.shape[0])
              and self.b2.shape[1] == inp)
        if self.bm is not None:
            ok = ok and tuple(self.bm.shape[:2]) == (self.b1.shape[1], self.b2.shape[0])
        if not ok:
            raise ShapeMismatchError(
                f"GLoRA tensors a1 {tuple(self.a1.shape)}, a2 {tuple(self.a2.shape)}, b1 {tuple(self.b1.shape)}, b2 "
                f"{tuple(self.b2.shape)} do not fit a weight of shape {tuple(self.shape)}; a1 is (in, r), a2 (r, in), "
                "b1 (out, r), b2 (r, in[, *k])"
            )

    @property
    def rank(self) -> int:
        """``r`` (``a2``'s rows)."""
        return int(self.a2.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r`` (``alpha`` 0 counts as ``r``)."""
        return (self.alpha or self.rank) / self.rank

    def b_delta(self) -> torch.Tensor:
        """The base-free half ``scale * B`` (float32, weight shape)."""
        b1 = f32(self.b1).reshape(self.b1.shape[0], -1)
        if self.bm is not None:
            b2 = f32(self.b2).reshape(self.b2.shape[0], -1)
            wb = torch.einsum("mn...,im,nj->ij...", f32(self.bm), b1, b2)
        else:
            wb = (b1 @ f32(self.b2).reshape(self.b2.shape[0], -1)).reshape(self.shape)
        return wb * self.scale

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + scale * (W A + B)`` (float32)."""
        return self.apply_weight_rows(weight, 0, weight.shape[0], None)

    def _a_matrix(self) -> torch.Tensor:
        return f32(self.a1).reshape(self.a1.shape[0], -1) @ f32(self.a2).reshape(self.a2.shape[0], -1)  # (in, in)

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``W + scale * (W A + B)`` (``A`` and ``B`` prepared once per tensor)."""
        wa = torch.einsum("oi...,ij->oj...", rows, cached(cache, "a", self._a_matrix))
        return rows + wa * self.scale + cached(cache, "b", self.b_delta)[r0:r1]
