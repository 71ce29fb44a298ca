"""VB-LoRA: LoRA factors assembled from a shared vector bank by top-k soft selection.

PEFT (``tuners/vblora``): one bank ``vblora_vector_bank (num_vectors, L)`` per adapter; per layer the logits
``vblora_logits_A (r, in / L, num_vectors)`` and ``vblora_logits_B (out / L, r, num_vectors)``. Each
length-``L`` piece of a factor is ``sum_k softmax(topk(logits))_k * bank[index_k]``; ``A`` is the pieces of
each rank row laid end to end ``(r, in)``, ``B`` is ``(out / L, L, r)`` reshaped to ``(out, r)``, and
``dW = B @ A`` (no scale; ``Conv1D`` through ``fan_in_fan_out``). Gotchas:

* With ``save_only_topk_weights=True`` the file holds, instead of the logits, the integer
  ``..._topk_indices`` and the float ``..._topk_weights`` with the *last* softmax weight dropped (it is
  ``1 - sum`` of the others). This kind stores that form directly (``indices_*`` are declared
  :attr:`VBLoRA.index_parts`, exempt from the floating-point check); from logits it selects the top-k itself.
* ``topk`` ties resolve as ``torch.topk`` does (the same call peft makes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape


def topk_from_logits(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, weights)`` of the ``topk`` largest logits along the last axis, weights softmax-normalised."""
    values, indices = logits.topk(topk, dim=-1)
    return indices, torch.softmax(f32(values), dim=-1)


def full_topk_weights(truncated: torch.Tensor) -> torch.Tensor:
    """The saved top-k weights with the dropped last one restored (``1 - sum`` of the others)."""
    t = f32(truncated)
    return torch.cat([t, 1 - t.sum(-1, keepdim=True)], dim=-1)


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class VBLoRA(AdditiveKind):
    """One VB-LoRA layer in top-k form.

    Args:
        bank: the shared ``vblora_vector_bank`` ``(num_vectors, L)``.
        indices_a: top-k bank indices for ``A``, ``(r, in / L, k)``, integer.
        weights_a: their weights ``(r, in / L, k)`` (summing to 1).
        indices_b: top-k bank indices for ``B``, ``(out / L, r, k)``, integer.
        weights_b: their weights ``(out / L, r, k)``.
        shape: module weight shape (module orientation).
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
    """

    bank: torch.Tensor
    indices_a: torch.Tensor
    weights_a: torch.Tensor
    indices_b: torch.Tensor
    weights_b: torch.Tensor
    shape: tuple[int, ...]
    fan_in_fan_out: bool = False
    module_type: str = "linear"

    kind: ClassVar[str] = "vblora"
    index_parts: ClassVar[frozenset[str]] = frozenset({"indices_a", "indices_b"})
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    @classmethod
    def from_logits(cls, bank: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor, topk: int,
                    shape: tuple[int, ...], fan_in_fan_out: bool = False) -> VBLoRA:
        """Build the layer from peft's full logits (``save_only_topk_weights=False``) and the config's ``topk``."""
        ia, wa = topk_from_logits(logits_a, topk)
        ib, wb = topk_from_logits(logits_b, topk)
        return cls(bank=bank, indices_a=ia, weights_a=wa, indices_b=ib, weights_b=wb, shape=tuple(shape),
                   fan_in_fan_out=fan_in_fan_out)

    def __post_init__(self) -> None:
        check_floating(self, self.index_parts)
        out, inp = math_shape(tuple(self.shape), self.fan_in_fan_out)
        if self.bank.ndim != 2:
            raise ShapeMismatchError(f"VB-LoRA vector bank has shape {tuple(self.bank.shape)}; it must be (num_vectors, L)")
        length = self.bank.shape[1]
        if (self.indices_a.shape != self.weights_a.shape or self.indices_b.shape != self.weights_b.shape
                or self.indices_a.ndim != 3 or self.indices_b.ndim != 3
                or self.indices_a.shape[1] * length != inp or self.indices_b.shape[0] * length != out
                or self.indices_a.shape[0] != self.indices_b.shape[1]):
            raise ShapeMismatchError(
                f"VB-LoRA top-k tensors A {tuple(self.indices_a.shape)} / B {tuple(self.indices_b.shape)} (bank vectors "
                f"of length {length}) do not fit a weight of shape {tuple(self.shape)}"
            )

    @property
    def rank(self) -> int:
        """``r``."""
        return int(self.indices_a.shape[0])

    def _pieces(self, indices: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (weights.to(dtype).unsqueeze(-1) * self.bank.to(dtype)[indices.long()]).sum(-2)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (out, r), A (r, in))`` in ``dtype`` (exact, rank ``r``)."""
        a = self._pieces(self.indices_a, self.weights_a, dtype).reshape(self.rank, -1)
        b = self._pieces(self.indices_b, self.weights_b, dtype).transpose(1, 2).reshape(-1, self.rank)
        return b, a

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        b, a = self.factors()
        return b @ a
