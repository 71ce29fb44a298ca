"""MiSS (formerly Bone): a shared block added to every column block of the weight, or the "bat" block-affine form.

PEFT (``tuners/miss``, ``miss_block``), three layouts told apart by the tensor's shape:

* default, ``(r, out)``: ``dW[o, c] = block[c mod r, o]`` (``block^T`` tiled along the input axis; when
  ``in`` is not a multiple of ``r`` the last partial tile takes the first ``in mod r`` rows).
* ``init_weights="mini"``, ``(r, mini_r)``: the block is first repeated ``out / mini_r`` times along its
  second axis, then as above.
* ``init_weights="bat"``, ``(out / r, r, r)``: base-dependent, ``W'_{ij} = W_{ij} + W_{ij} @ B_i + B_i`` for
  every ``r x r`` tile ``(i, j)`` (row block ``i``), so it has no base-free delta (:class:`MiSSBat`).

Bone (peft < 0.17, ``bone_block``) is the same math under the old name; a reader maps it here. Only
``nn.Linear``; no scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import DeltaMixin, check_floating, f32
from .basedep import BaseDependent


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class MiSS(DeltaMixin):
    """One MiSS layer in the default (``(r, out)``) or "mini" (``(r, mini_r)``) layout.

    Args:
        block: ``miss_block``.
        shape: module weight shape ``(out, in)``.
    """

    block: torch.Tensor
    shape: tuple[int, ...]
    module_type: str = "linear"

    kind: ClassVar[str] = "miss"
    fan_in_fan_out: ClassVar[bool] = False
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        if (self.block.ndim != 2 or len(self.shape) != 2 or self.shape[0] % self.block.shape[1] != 0
                or self.block.shape[0] > self.shape[1]):
            raise ShapeMismatchError(f"MiSS block has shape {tuple(self.block.shape)}; for a weight of shape "
                                     f"{tuple(self.shape)} it must be (r, out) or (r, mini_r) with mini_r dividing out")

    @property
    def rank(self) -> int:
        """``r``, the tile width."""
        return int(self.block.shape[0])

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``."""
        out, inp = self.shape
        block = f32(self.block).repeat(1, out // self.block.shape[1])  # (r, out)
        return block.T[:, torch.arange(inp) % self.rank]


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class MiSSBat(BaseDependent):
    """One MiSS layer in the "bat" layout: ``W'_{ij} = W_{ij} (I + B_i) + B_i`` per ``r x r`` tile.

    Args:
        block: ``miss_block`` ``(out / r, r, r)``.
        shape: module weight shape ``(out, in)``, both multiples of ``r``.
    """

    block: torch.Tensor
    shape: tuple[int, ...]
    module_type: str = "linear"

    kind: ClassVar[str] = "miss_bat"
    fan_in_fan_out: ClassVar[bool] = False
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        b = self.block
        if (b.ndim != 3 or b.shape[1] != b.shape[2] or len(self.shape) != 2 or self.shape[0] != b.shape[0] * b.shape[2]
                or self.shape[1] % b.shape[2] != 0):
            raise ShapeMismatchError(f"MiSS bat block has shape {tuple(b.shape)}; for a weight of shape {tuple(self.shape)} "
                                     "it must be (out / r, r, r) with r dividing in")

    @property
    def rank(self) -> int:
        """``r``, the tile size."""
        return int(self.block.shape[2])

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W'_{ij} = W_{ij} + W_{ij} @ B_i + B_i`` for the ``r x r`` tiles of the float32 weight."""
        r = self.rank
        out, inp = weight.shape
        tiles = weight.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)  # [i, j] tiles
        blk = f32(self.block)[:, None]  # (out / r, 1, r, r)
        new = tiles + tiles @ blk + blk
        return new.permute(0, 2, 1, 3).reshape(out, inp)
