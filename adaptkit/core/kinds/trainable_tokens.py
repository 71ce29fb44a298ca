"""Trainable tokens (PEFT ``trainable_tokens_delta``): new values for chosen rows of an embedding matrix.

PEFT (``tuners/trainable_tokens``) stores ``<path>.trainable_tokens_delta (k, dim)``; despite the name it
holds the rows' *new values*, not differences (``merge`` is ``W.index_copy(0, token_indices, delta)``).
Gotchas: the row numbers are **not** in the file, they are the config's ``token_indices`` (a list, or a dict
per target layer); ``trainable_tokens_original`` is not saved either, so the kind replaces rows and cannot
be unfused. Works on the module weight's rows directly (``(num_embeddings, dim)``, also a tied ``lm_head``).
Base-dependent: ``additive`` is False, ``delta()`` raises; ``delta_for(W)`` gives the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import check_floating, f32
from .basedep import BaseDependent


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class TrainableTokens(BaseDependent):
    """New rows of one embedding (or tied output) matrix.

    Args:
        values: ``trainable_tokens_delta`` ``(k, dim)``, the rows' new values.
        token_indices: ``(k,)`` integer row numbers (the config's ``token_indices``).
        shape: the module weight's shape ``(num_embeddings, dim)``, or ``None`` until :meth:`fit` takes the base's.
    """

    values: torch.Tensor
    token_indices: torch.Tensor
    shape: tuple[int, ...] | None
    module_type: str = "embedding"

    kind: ClassVar[str] = "trainable_tokens"
    effect: ClassVar[str] = "replaces chosen rows of the base embedding"
    rowwise: ClassVar[bool] = True
    index_parts: ClassVar[frozenset[str]] = frozenset({"token_indices"})
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self, self.index_parts)
        if self.shape is None:  # a PEFT file does not hold num_embeddings: fit(shape) takes the base's
            if self.values.ndim != 2 or tuple(self.token_indices.shape) != (self.values.shape[0],):
                raise ShapeMismatchError(f"trainable tokens: values {tuple(self.values.shape)} need one token index per "
                                         f"row, got token_indices {tuple(self.token_indices.shape)}")
            if self.token_indices.numel() and int(self.token_indices.min()) < 0:
                raise ShapeMismatchError("trainable token indices are negative; the config's token_indices are damaged")
            return
        if (self.values.ndim != 2 or len(self.shape) != 2 or self.values.shape[1] != self.shape[1]
                or tuple(self.token_indices.shape) != (self.values.shape[0],)):
            raise ShapeMismatchError(f"trainable tokens: values {tuple(self.values.shape)} and token_indices "
                                     f"{tuple(self.token_indices.shape)} do not fit an embedding of shape {tuple(self.shape)}")
        if self.token_indices.numel() and (int(self.token_indices.min()) < 0
                                           or int(self.token_indices.max()) >= self.shape[0]):
            raise ShapeMismatchError(f"trainable token indices fall outside the {self.shape[0]} rows of the embedding; "
                                     "the config's token_indices do not belong to this model")

    @property
    def rank(self) -> int:
        """The number of replaced rows."""
        return int(self.values.shape[0])

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with the chosen rows replaced (float32)."""
        return weight.index_copy(0, self.token_indices.long(), f32(self.values))

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1`` with the chosen rows among them replaced."""
        idx = self.token_indices.long()
        inside = (idx >= r0) & (idx < r1)
        return rows.index_copy(0, idx[inside] - r0, f32(self.values)[inside])
