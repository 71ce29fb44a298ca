"""DeLoRA: a LoRA with each rank-one term normalised and bounded, scaled by the base's column norms.

PEFT (``tuners/delora``): ``dW = B @ diag(lambda / r / (|A_i| |B^i|)) @ A * w_norm[None, :]`` with the row
norms of ``A`` and column norms of ``B`` each clamped below at ``1e-4``. Gotchas:

* ``delora_w_norm`` (``||W[:, j]||``, the base weight's column norms at creation) is a *persistent* buffer,
  so it is in the file and the delta needs no base weight: the kind is additive.
* ``delora_lambda`` is a 1-element tensor; ``r`` is ``A``'s row count (rank_pattern already resolved).
* Only ``nn.Linear`` is supported by peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, math_shape

#: peft's lower clamp of the factor norms
NORM_FLOOR = 1e-4


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class DeLoRA(AdditiveKind):
    """One DeLoRA layer.

    Args:
        a: ``delora_A`` ``(r, in)``.
        b: ``delora_B`` ``(out, r)``.
        lam: ``delora_lambda`` (1 element).
        w_norm: ``delora_w_norm`` ``(in,)``.
        shape: module weight shape (module orientation).
        fan_in_fan_out: the module stores the transpose (a ``Conv1D``; peft adapts ``nn.Linear`` only).
    """

    a: torch.Tensor
    b: torch.Tensor
    lam: torch.Tensor
    w_norm: torch.Tensor
    shape: tuple[int, ...]
    module_type: str = "linear"
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "delora"
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        if (self.a.ndim != 2 or self.b.ndim != 2 or self.b.shape[1] != self.a.shape[0] or self.lam.numel() != 1
                or math_shape(tuple(self.shape), self.fan_in_fan_out) != (self.b.shape[0], self.a.shape[1]) or self.w_norm.numel() != self.a.shape[1]):
            raise ShapeMismatchError(
                f"DeLoRA tensors delora_A {tuple(self.a.shape)}, delora_B {tuple(self.b.shape)}, lambda "
                f"{tuple(self.lam.shape)}, w_norm {tuple(self.w_norm.shape)} do not fit a weight of shape {tuple(self.shape)}"
            )

    @property
    def rank(self) -> int:
        """``r``."""
        return int(self.a.shape[0])

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype`` (exact, rank ``r``): ``U = B * lambda / r / (|A_i| |B^i|)``, ``V = A * w_norm``."""
        a, b = self.a.to(dtype), self.b.to(dtype)
        norms = a.norm(dim=1).clamp(min=NORM_FLOOR) * b.norm(dim=0).clamp(min=NORM_FLOOR)
        u = b * (self.lam.to(dtype).reshape(()) / self.rank / norms)[None, :]
        return u, a * self.w_norm.to(dtype).reshape(1, -1)

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``."""
        u, v = self.factors()
        return u @ v
