"""OFT (PEFT): a block-diagonal orthogonal rotation of the input features, ``W' = W R^T`` (multiplicative).

PEFT 0.21 (``tuners/oft``) stores ``oft_R.weight`` (``oft_embedding_R.weight`` for embeddings) of shape
``(n_blocks, b(b-1)/2)``: the strict upper triangles of skew-symmetric ``b x b`` blocks ``Q`` (``(1, ...)``
with ``block_share``, the one block then repeated ``in / b`` times). Each block becomes orthogonal through
a Cayley map, and the blocks are laid out on the diagonal of ``R`` (``in x in``; ``in * kh * kw`` for a
conv). peft's ``get_delta_weight`` returns ``R`` itself (:meth:`OFT.rotation`), not a weight difference.
Gotchas:

* ``use_cayley_neumann=True`` (the default) is a truncated series approximating ``(I + Q)(I - Q)^{-1}``
  (with peft's 3/4-term quirk, see :func:`~adaptkit.core.kinds.orthogonal.cayley_neumann`), while
  ``use_cayley_neumann=False`` solves ``X (I + Q) = I - Q``, i.e. ``(I - Q)(I + Q)^{-1}``: the two settings
  give (approximately) transposed rotations for the same parameters. Both are reproduced as peft has them.
* ``coft=True`` rescales every skew block to Frobenius norm at most ``eps / sqrt(n_stored_blocks)`` before
  the Cayley map (peft writes the projected weight back into the parameter; a saved file may hold either).
* Linear and conv merge as ``W_flat @ R^T`` (conv flattened ``(out, in*kh*kw)`` in ``(in, kh, kw)`` order);
  embeddings as ``W @ R`` (``(num, dim) @ (dim, dim)``), *not* transposed. ``Conv1D`` is not supported by
  peft's OFT merge and is refused here.
* The effect depends on the base weight: ``additive`` is False and ``delta()`` raises (use ``apply``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import check_floating, f32
from .basedep import BaseDependent, cached
from .orthogonal import (
    block_diag,
    cayley_neumann,
    cayley_right,
    skew_from_triu,
    triu_from_skew,
)


def block_size_of(n_elements: int) -> int:
    """The block size ``b`` with ``b (b - 1) / 2 == n_elements``.

    Raises:
        ShapeMismatchError: no integer block size fits.
    """
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements:
        raise ShapeMismatchError(f"OFT parameter rows have {n_elements} entries, which is no b(b-1)/2; the checkpoint is "
                                 "damaged or not an OFT adapter")
    return b


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class OFT(BaseDependent):
    """One PEFT OFT layer.

    Args:
        weight: ``oft_R.weight`` ``(n_blocks, b(b-1)/2)`` (``(1, ...)`` with ``block_share``).
        shape: module weight shape (module orientation), or ``None`` until :meth:`fit` takes the base's.
        module_type: ``"linear"``, ``"conv"`` or ``"embedding"``.
        coft: constrain the blocks' norms (``coft``) with ``eps``.
        eps: the COFT bound.
        use_cayley_neumann: the truncated series (peft's default) instead of the exact Cayley map.
        num_cayley_neumann_terms: the series' number of terms.
    """

    weight: torch.Tensor
    shape: tuple[int, ...] | None
    module_type: str = "linear"
    coft: bool = False
    eps: float = 6e-5
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    kind: ClassVar[str] = "oft"
    effect: ClassVar[str] = "rotates the input features of the base weight (multiplicative)"
    rowwise: ClassVar[bool] = True
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        if self.weight.ndim != 2:
            raise ShapeMismatchError(f"OFT weight has shape {tuple(self.weight.shape)}; it must be (n_blocks, b(b-1)/2)")
        b = block_size_of(int(self.weight.shape[1]))
        if self.shape is None:  # a PEFT file does not fix the weight shape: fit(shape) takes the base's
            return
        dim = self.rotated_features
        if dim % b != 0 or self.weight.shape[0] not in (1, dim // b):
            raise ShapeMismatchError(f"OFT blocks {tuple(self.weight.shape)} (block size {b}) do not fit a weight of shape "
                                     f"{tuple(self.shape)} ({dim} rotated features)")

    @property
    def block_size(self) -> int:
        """``b``."""
        return block_size_of(int(self.weight.shape[1]))

    @property
    def rotated_features(self) -> int:
        """The size of ``R``: ``in`` (linear), ``in * kh * kw`` (conv) or the embedding dim."""
        return int(self.shape[1]) if self.module_type == "embedding" else math.prod(self.shape[1:])

    @property
    def rank(self) -> int:
        """The number of diagonal blocks (peft's ``r``; the stored rows while the shape is open)."""
        if self.shape is None:
            return int(self.weight.shape[0])
        return self.rotated_features // self.block_size

    def rotation(self) -> torch.Tensor:
        """Float32 ``R`` (peft's ``get_delta_weight``): the block-diagonal orthogonal matrix."""
        b = self.block_size
        vec = f32(self.weight)
        if self.coft:
            q = skew_from_triu(vec, b)
            bound = self.eps / math.sqrt(q.shape[0])
            norm = torch.linalg.matrix_norm(q, keepdim=True)
            q = torch.where(norm <= bound, q, q * (bound / norm))
            vec = triu_from_skew(q)
        q = skew_from_triu(vec, b)
        blocks = cayley_neumann(q, self.num_cayley_neumann_terms) if self.use_cayley_neumann else cayley_right(q)
        return block_diag(blocks, self.rank)

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W R`` for embeddings, ``W_flat R^T`` otherwise (float32)."""
        return self.apply_weight_rows(weight, 0, weight.shape[0], None)

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1`` rotated: each row of ``W`` is multiplied by the same ``R`` (prepared once per tensor)."""
        r = cached(cache, "rotation", self.rotation)
        if self.module_type == "embedding":
            return rows @ r
        return (rows.reshape(rows.shape[0], -1) @ r.T).reshape(rows.shape)
