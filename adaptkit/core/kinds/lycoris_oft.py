"""LyCORIS diag-OFT and BOFT: orthogonal rotations of the *output* rows, ``W' = rescale * M W`` (multiplicative).

LyCORIS 4.1 (``lycoris/modules/diag_oft.py``, ``boft.py``) stores ``oft_blocks``, an optional ``rescale``
``(out, 1, ...)`` and ``alpha`` (the *constraint*; 0 means none). Gotchas:

* Unlike PEFT's OFT these rotate the output features (rows of ``W``), ``Q = B - B^T`` (no ``/ 2``) and the
  Cayley map is ``R = (I + Q)(I - Q)^{-1}`` (see :mod:`adaptkit.core.kinds.orthogonal`), computed in float32
  because LyCORIS inverts in float32.
* The constraint bounds the Frobenius norm of *all* skew blocks together at ``alpha * out``: when
  ``||Q|| + 1e-8`` exceeds it every block is multiplied by ``alpha * out / (||Q|| + 1e-8)``.
* diag-OFT: ``oft_blocks (n, b, b)``, block ``k`` of rows becomes ``R_k^T W_k`` (LyCORIS's einsum
  ``"k n m, k n ... -> k m ..."``), so ``M = blockdiag(R_k^T)``.
* BOFT: ``oft_blocks (m, n, b, b)`` (4-D tells the two apart); stage ``i`` gathers the rows into blocks of
  ``b`` by splitting the row index as ``(outer, 2, 2^i * b/2)`` and swapping the last two parts, applies
  ``R_{i,k}`` (not transposed) to each block and scatters the rows back. ``M = S_{m-1} ... S_0``.
* ``rescale`` multiplies the rotated rows: ``W' = rescale * (M W)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import Layer, check_floating, f32
from .basedep import BaseDependent
from .common import conv_or_linear
from .orthogonal import block_diag, cayley_lycoris


def _rotations(blocks: torch.Tensor, constraint: float, out_dim: int) -> torch.Tensor:
    """LyCORIS's ``get_r``: the Cayley rotations of ``blocks - blocks^T`` with the joint norm constraint."""
    b = f32(blocks)
    q = b - b.transpose(-1, -2)
    bound = float(constraint) * out_dim
    if bound > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > bound:
            q = q * (bound / norm)
    return cayley_lycoris(q)


def _butterfly_rows(out_dim: int, stage: int, block: int) -> torch.Tensor:
    """The row order LyCORIS BOFT's stage ``stage`` groups into consecutive blocks of ``block`` rows."""
    k = 2 ** stage * (block // 2)
    return torch.arange(out_dim).reshape(-1, 2, k).transpose(1, 2).reshape(-1)


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class LycorisOFT(BaseDependent):
    """One LyCORIS diag-OFT (``oft_blocks`` 3-D) or BOFT (``oft_blocks`` 4-D) layer.

    Args:
        oft_blocks: ``(n, b, b)`` (diag-OFT) or ``(m, n, b, b)`` (BOFT).
        shape: module weight shape ``(out, ...)``, or ``None`` where only the output features are known (a file
            fixes ``out = n * b`` but not the inputs); :meth:`fit` with the base's shape fills it in.
        constraint: the stored ``alpha`` (0: unconstrained).
        rescale: ``rescale`` ``(out, 1, ...)`` or ``None``.
        module_type: ``"linear"`` or ``"conv"``.
    """

    oft_blocks: torch.Tensor
    shape: tuple[int, ...] | None = None
    constraint: float = 0.0
    rescale: torch.Tensor | None = None
    module_type: str = "linear"

    kind: ClassVar[str] = "lycoris_oft"
    effect: ClassVar[str] = "rotates the output rows of the base weight (multiplicative)"
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        ob = self.oft_blocks
        square = ob.ndim in (3, 4) and ob.shape[-1] == ob.shape[-2]
        if not square or (self.shape is not None and ob.shape[-3] * ob.shape[-1] != self.shape[0]):
            fits = f"a weight of shape {tuple(self.shape)}" if self.shape is not None else "any weight"
            raise ShapeMismatchError(f"LyCORIS OFT blocks {tuple(ob.shape)} do not fit {fits}; they are (n, b, b) "
                                     "(diag-OFT) or (m, n, b, b) (BOFT) with n * b output features: the checkpoint is "
                                     "damaged or made for another model")
        if self.rescale is not None and self.rescale.numel() != self.out_features:
            raise ShapeMismatchError(f"LyCORIS OFT rescale has {self.rescale.numel()} entries but the blocks rotate "
                                     f"{self.out_features} output features; the checkpoint is damaged")
        if ob.ndim == 4 and ob.shape[-1] % 2:
            raise ShapeMismatchError(f"LyCORIS BOFT block size {ob.shape[-1]} is odd; butterfly blocks have an even size")

    @property
    def butterfly(self) -> bool:
        """True for BOFT (4-D blocks)."""
        return self.oft_blocks.ndim == 4

    @property
    def out_features(self) -> int:
        """``n * b``: the output features the blocks rotate."""
        return int(self.oft_blocks.shape[-3] * self.oft_blocks.shape[-1])

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """As :meth:`BaseDependent.fit`; a layer read without a shape also takes the module type from ``shape``."""
        fitted = super().fit(shape, module)
        if self.shape is None and fitted.shape is not None:
            fitted = dataclasses.replace(fitted, module_type=conv_or_linear(tuple(fitted.shape)))
        return fitted

    def check_weight(self, weight: torch.Tensor) -> None:
        """Refuse a base weight of another shape, or (layer without a shape) with rows the blocks do not rotate.

        Raises:
            ShapeMismatchError: naming both.
        """
        super().check_weight(weight)
        if weight.shape[0] != self.out_features:
            raise ShapeMismatchError(f"LyCORIS OFT blocks {tuple(self.oft_blocks.shape)} rotate {self.out_features} "
                                     f"output features but the weight {tuple(weight.shape)} has {weight.shape[0]}; pass "
                                     "the base weight of the module it adapts")

    @property
    def rank(self) -> int:
        """The number of blocks per stage."""
        return int(self.oft_blocks.shape[-3])

    def rotation(self) -> torch.Tensor:
        """Float32 ``M`` ``(out, out)``: ``W' = rescale * (M W_flat)``."""
        out_dim = self.out_features
        r = _rotations(self.oft_blocks, self.constraint, out_dim)
        if not self.butterfly:
            return block_diag(r.transpose(-1, -2))
        m = None
        for i in range(r.shape[0]):
            order = _butterfly_rows(out_dim, i, r.shape[-1])
            stage = torch.zeros(out_dim, out_dim)
            stage[order[:, None], order[None, :]] = block_diag(r[i])  # rows gathered, rotated, scattered back
            m = stage if m is None else stage @ m
        return m

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``rescale * (M W)`` (float32)."""
        new = (self.rotation() @ weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
        if self.rescale is not None:
            new = new * f32(self.rescale).reshape(-1, *([1] * (weight.ndim - 1)))
        return new
