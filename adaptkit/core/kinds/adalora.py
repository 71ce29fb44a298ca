"""AdaLoRA: an SVD-shaped LoRA, ``dW = (B @ (A * E)) * alpha / (ranknum + 1e-5)`` (PEFT ``lora_A/lora_B/lora_E``).

Gotchas found in peft 0.21.2 (``tuners/adalora``):

* ``ranknum`` is not in the state dict. It is ``float(r)`` for the rank the module was *created* with, i.e.
  the config's ``init_r``: when a checkpoint with a ``rank_pattern`` is loaded, the modules are built with
  ``init_r``, then pruned to ``sum(mask)`` ranks, and ``ranknum`` is copied over from before the pruning.
  So a pruned layer keeps dividing by ``init_r``, never by its own (smaller) rank.
* The divisor is ``ranknum + 1e-5`` (the epsilon is part of peft's math and kept here).
* ``scaling`` is ``lora_alpha``, or, when ``lora_alpha`` is 0, the rank passed to the last ``update_layer``
  (the pruned rank after loading); a reader resolves that into ``alpha``.
* Rank 0 after pruning is allowed (peft #1539): the tensors are then empty (``(0, in)``, ``(out, 0)``,
  ``(0, 1)``) and the layer's delta is zero. Saved pruned tensors keep only the ranks the mask kept.
* Conv2d: ``lora_A`` is ``(r, in * kh * kw)`` and the delta is reshaped to the weight; ``Conv1D`` uses
  ``fan_in_fan_out`` (PEFT's ``transpose``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, math_shape

#: the epsilon peft adds to ``ranknum`` before dividing
RANKNUM_EPS = 1e-5


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class AdaLoRA(AdditiveKind):
    """One AdaLoRA layer.

    Args:
        a: ``lora_A`` ``(r, in * k)``, the right singular vectors.
        b: ``lora_B`` ``(out, r)``, the left singular vectors.
        e: ``lora_E`` ``(r, 1)``, the singular values.
        alpha: peft's ``scaling`` (``lora_alpha``).
        ranknum: the divisor's rank, the config's ``init_r`` (not the stored rank after pruning).
        shape: module weight shape (module orientation).
        module_type: ``"linear"`` or ``"conv"``.
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
    """

    a: torch.Tensor
    b: torch.Tensor
    e: torch.Tensor
    alpha: float
    ranknum: float
    shape: tuple[int, ...]
    module_type: str = "linear"
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "adalora"

    def __post_init__(self) -> None:
        check_floating(self)
        if self.a.ndim != 2 or self.b.ndim != 2 or self.e.ndim != 2 or self.e.shape[1] != 1:
            raise ShapeMismatchError(f"AdaLoRA tensors lora_A {tuple(self.a.shape)}, lora_B {tuple(self.b.shape)}, lora_E "
                                     f"{tuple(self.e.shape)} must be (r, in), (out, r) and (r, 1)")
        r = self.a.shape[0]
        if self.b.shape[1] != r or self.e.shape[0] != r:
            raise ShapeMismatchError(f"AdaLoRA tensors disagree on the rank: lora_A {tuple(self.a.shape)}, lora_B "
                                     f"{tuple(self.b.shape)}, lora_E {tuple(self.e.shape)}; the checkpoint is inconsistent")
        ms = math_shape(tuple(self.shape), self.fan_in_fan_out)
        if ms[0] != self.b.shape[0] or math.prod(ms[1:]) != self.a.shape[1]:
            raise ShapeMismatchError(f"AdaLoRA lora_A {tuple(self.a.shape)} / lora_B {tuple(self.b.shape)} do not fit a "
                                     f"weight of shape {tuple(self.shape)}")
        if not self.ranknum > 0:
            raise ShapeMismatchError(f"AdaLoRA ranknum is {self.ranknum}; it is the config's init_r and must be positive")

    @property
    def rank(self) -> int:
        """The stored rank (after pruning; may be 0)."""
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / (ranknum + 1e-5)``, peft's ``scaling / (ranknum + 1e-5)``."""
        return self.alpha / (self.ranknum + RANKNUM_EPS)

    def _uv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b.to(dtype) * self.scale, self.a.to(dtype) * self.e.to(dtype)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, V)`` in ``dtype``: ``U = B * scale`` ``(out, r)``, ``V = A * E`` ``(r, in * k)``; ``U @ V`` is the
        flattened delta (exact, rank ``r``). ``None`` for a layer pruned to rank 0 (its delta is zero)."""
        return None if self.rank == 0 else self._uv(dtype)

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation (zero at rank 0)."""
        u, v = self._uv(torch.float32)
        return (u @ v).reshape(math_shape(tuple(self.shape), self.fan_in_fan_out))
