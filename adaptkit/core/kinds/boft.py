"""BOFT (PEFT): a product of butterfly-permuted block-diagonal rotations and an output scale, ``W' = (W M^T) * s``.

PEFT 0.21 (``tuners/boft``) stores ``boft_R (m, n_blocks, b, b)`` (``m`` butterfly factors, full blocks, made
skew as ``(B - B^T) / 2``) and ``boft_s`` (``(out, 1)`` for linear, ``(1, out)`` for conv). Factor ``i`` is
``P_i D_i P_i^T`` with ``D_i`` the block diagonal of the exact Cayley maps (``X (I + Q) = I - Q``) and
``P_i`` peft's ``block_butterfly_perm(n, n_blocks / 2^i, b / 2, m - 1)``; ``M = F_{m-1} ... F_1 F_0``.
Gotchas:

* The number of factors comes from ``boft_R.shape[0]``, never from the config: without peft's CUDA
  extension (``fbd_cuda``) peft *forces* ``boft_n_butterfly_factor`` to 1 when it builds the model, so a
  file saved on a CUDA machine with ``m > 1`` cannot even be loaded by peft on CPU. This kind handles any
  ``m`` (the CUDA path's math); peft's CPU ``torch.block_diag`` path only works for ``m == 1``.
* With ``m == 1`` the permutation is the identity.
* Conv weights are rotated flattened ``(out, in*kh*kw)``; ``boft_s`` scales the output rows.
* Multiplicative: ``additive`` is False, ``delta()`` raises (use ``apply``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import check_floating, f32
from .basedep import BaseDependent, cached
from .orthogonal import block_diag, cayley_right


def butterfly_permutation(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """peft's butterfly permutation of ``n`` features: within each of ``blocks`` groups, its ``half``-sized chunks
    reordered even-numbered first, then odd-numbered (the identity when ``factors == 0``).

    The permutation matrix is ``P[i, perm[i]] = 1``, so ``P D P^T == D[perm][:, perm]``.
    """
    if factors == 0:
        return torch.arange(n)
    size = n // blocks
    chunks = size // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, n, size)])


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class BOFT(BaseDependent):
    """One PEFT BOFT layer.

    Args:
        boft_r: ``boft_R`` ``(m, n_blocks, b, b)``.
        boft_s: ``boft_s`` (``(out, 1)`` or ``(1, out)``).
        shape: module weight shape (module orientation), or ``None`` until :meth:`fit` takes the base's (a
            conv kernel size is not in the file).
        module_type: ``"linear"`` or ``"conv"``.
    """

    boft_r: torch.Tensor
    boft_s: torch.Tensor
    shape: tuple[int, ...] | None
    module_type: str = "linear"

    kind: ClassVar[str] = "boft"
    effect: ClassVar[str] = "rotates the input features of the base weight and rescales its rows (multiplicative)"
    rowwise: ClassVar[bool] = True
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        r = self.boft_r
        n = r.shape[1] * r.shape[2] if self.shape is None or r.ndim != 4 else math.prod(self.shape[1:])
        out = self.boft_s.numel() if self.shape is None else self.shape[0]
        if r.ndim != 4 or r.shape[2] != r.shape[3] or r.shape[1] * r.shape[2] != n or self.boft_s.numel() != out:
            raise ShapeMismatchError(f"BOFT tensors boft_R {tuple(r.shape)} / boft_s {tuple(self.boft_s.shape)} do not fit "
                                     f"a weight of shape {tuple(self.shape)}; boft_R is (factors, blocks, b, b) with "
                                     "blocks * b the input features")

    @property
    def factors_count(self) -> int:
        """The number of butterfly factors ``m``."""
        return int(self.boft_r.shape[0])

    @property
    def rank(self) -> int:
        """The number of blocks per factor (peft's ``boft_block_num``)."""
        return int(self.boft_r.shape[1])

    def rotation(self) -> torch.Tensor:
        """Float32 ``M`` (the first half of peft's ``get_delta_weight``)."""
        m, nb, b, _ = self.boft_r.shape
        n = nb * b
        q = f32(self.boft_r).reshape(m * nb, b, b)
        blocks = cayley_right(0.5 * (q - q.transpose(1, 2))).reshape(m, nb, b, b)
        out = None
        for i in range(m):
            perm = butterfly_permutation(n, nb // 2 ** i, b // 2, m - 1)
            factor = block_diag(blocks[i])[perm][:, perm]
            out = factor if out is None else factor @ out
        return out

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``(W_flat M^T) * s`` (float32)."""
        return self.apply_weight_rows(weight, 0, weight.shape[0], None)

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``(W_flat M^T) * s``: the same ``M`` for every row, ``s`` per row."""
        flat = rows.reshape(rows.shape[0], -1) @ cached(cache, "rotation", self.rotation).T
        return (flat * f32(self.boft_s).reshape(-1, 1)[r0:r1]).reshape(rows.shape)
