"""SHiRA: a sparse high-rank update, ``dW[indices] = values * scaling`` (PEFT ``shira_weight`` + ``shira_indices``).

Gotchas (peft 0.21.2, ``tuners/shira``):

* ``shira_indices`` (``(2, n)`` row/column positions) *are* saved, as ``int32`` (``torch.int``), or as
  float32 on Windows (peft converts them back to integers on load); a reader converts float positions with
  ``.long()`` before building the layer. They are declared :attr:`SHiRA.index_parts`, exempt from the
  floating-point check of :func:`adaptkit.core.kinds.base.check_factors`.
* The delta is a ``sparse_coo_tensor``: repeated positions add up (``index_put_`` with ``accumulate``).
* ``scaling`` is 1.0 at save time (peft's ``set_scale`` changes it only in memory); only ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape
from .positions import check_positions


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class SHiRA(AdditiveKind):
    """One SHiRA layer.

    Args:
        values: ``shira_weight`` ``(n,)``.
        indices: ``shira_indices`` ``(2, n)``, integer.
        shape: module weight shape (module orientation), or ``None`` until :meth:`fit` takes the base's.
        scaling: peft's ``scaling`` (1.0 as saved).
        fan_in_fan_out: the module stores the transpose (a ``Conv1D``; peft adapts ``nn.Linear`` only); the
            positions are then in the math orientation ``(out, in)``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, ...] | None
    scaling: float = 1.0
    module_type: str = "linear"
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "shira"
    index_parts: ClassVar[frozenset[str]] = frozenset({"indices"})
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self, self.index_parts)
        if self.shape is None:  # a PEFT file does not hold the weight shape: fit(shape) takes the base's
            check_positions("SHiRA", self.values, self.indices, 2 ** 62, 2 ** 62)
            return
        if len(self.shape) != 2:
            raise ShapeMismatchError(f"SHiRA adapts 2-D weights, got weight shape {tuple(self.shape)}")
        check_positions("SHiRA", self.values, self.indices, *math_shape(tuple(self.shape), self.fan_in_fan_out))

    @property
    def scale(self) -> float:
        """peft's ``scaling``."""
        return float(self.scaling)

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)`` (repeated positions add up)."""
        dense = torch.zeros(math_shape(tuple(self.shape), self.fan_in_fan_out), dtype=torch.float32)
        idx = self.indices.long()
        return dense.index_put_((idx[0], idx[1]), f32(self.values) * self.scale, accumulate=True)
