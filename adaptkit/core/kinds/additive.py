"""The shared protocol base of the additive kinds added after LoRA: row-wise fusing and an SVD-built LoRA form.

AdaLoRA, VeRA, RandLoRA, VB-LoRA, DeLoRA, GraLoRA, MiSS, FourierFT, WaveFT, SHiRA and C3A have a base-free delta
(``apply(W) = W + delta``). On top of :class:`~adaptkit.core.kinds.common.DeltaMixin` this base gives them
``apply_rows`` (from their exact ``factors()`` where they have them, else from the dense delta prepared once per
tensor) and ``to_lora`` (an exact SVD of the factors, so the LoRA is exact at their rank, or of the dense delta).
"""

from __future__ import annotations

import torch

from .common import DeltaMixin, add_delta_rows
from .lora import LoRA, factored_to_lora


class AdditiveKind(DeltaMixin):
    """An additive kind fused row block by row block and converted to LoRA through an SVD of its delta."""

    @property
    def rowwise(self) -> bool:
        """Each output row of ``W + delta`` needs only the same rows of ``W``."""
        return self.additive

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Add ``weight * delta`` to rows ``r0:r1`` of the module weight in place (from ``U V`` where low rank)."""
        return add_delta_rows(self, rows, r0, r1, weight, cache)

    def to_lora(self, rank: int | None) -> tuple[LoRA, float, float, str]:
        """An exact SVD of the factors (exact at the kind's rank) or of the dense delta, truncated to ``rank``."""
        return factored_to_lora(self, rank)


__all__ = ["AdditiveKind"]
