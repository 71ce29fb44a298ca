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
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape
from .basedep import BaseDependent


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class MiSS(AdditiveKind):
    """One MiSS layer in the default (``(r, out)``) or "mini" (``(r, mini_r)``) layout.

    Args:
        block: ``miss_block``.
        shape: module weight shape (module orientation); ``None`` when read from a PEFT file, which does not say
            ``in`` (``fit`` with the base's shape fills it).
        fan_in_fan_out: the module stores the transpose (a ``Conv1D``; peft adapts ``nn.Linear`` only).
    """

    block: torch.Tensor
    shape: tuple[int, ...] | None
    module_type: str = "linear"
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "miss"
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        if self.shape is None:  # a PEFT file does not hold in_features: fit(shape) takes the base's
            if self.block.ndim != 2:
                raise ShapeMismatchError(f"MiSS block has shape {tuple(self.block.shape)}; it must be (r, out) or (r, mini_r)")
            return
        if len(self.shape) != 2:
            raise ShapeMismatchError(f"MiSS adapts 2-D weights, got weight shape {tuple(self.shape)}")
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        if self.block.ndim != 2 or out % self.block.shape[1] != 0 or self.block.shape[0] > inp:
            raise ShapeMismatchError(f"MiSS block has shape {tuple(self.block.shape)}; for a weight of shape "
                                     f"{tuple(self.shape)} it must be (r, out) or (r, mini_r) with mini_r dividing out")

    @property
    def rank(self) -> int:
        """``r``, the tile width."""
        return int(self.block.shape[0])

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype`` (exact, rank ``r``): ``U`` the tiled block transposed ``(out, r)``, ``V`` the 0/1
        matrix ``(r, in)`` that copies column ``c mod r`` to column ``c``."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        u = self.block.to(dtype).repeat(1, out // self.block.shape[1]).T  # (out, r)
        v = (torch.arange(self.rank)[:, None] == torch.arange(inp)[None, :] % self.rank).to(dtype)
        return u, v

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``: ``dW[o, c] = block[c mod r, o]``."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
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
    shape: tuple[int, ...] | None
    module_type: str = "linear"

    kind: ClassVar[str] = "miss_bat"
    effect: ClassVar[str] = "multiplies every tile of the base weight by a shared block and adds it (W + W·B + B)"
    rowwise: ClassVar[bool] = True
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        b = self.block
        if self.shape is None and b.ndim == 3 and b.shape[1] == b.shape[2]:
            return  # a PEFT file does not hold in_features: fit(shape) takes the base's
        if (b.ndim != 3 or b.shape[1] != b.shape[2] or self.shape is None or len(self.shape) != 2 or self.shape[0] != b.shape[0] * b.shape[2]
                or self.shape[1] % b.shape[2] != 0):
            raise ShapeMismatchError(f"MiSS bat block has shape {tuple(b.shape)}; for a weight of shape {tuple(self.shape)} "
                                     "it must be (out / r, r, r) with r dividing in")

    @property
    def rank(self) -> int:
        """``r``, the tile size."""
        return int(self.block.shape[2])

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W'_{ij} = W_{ij} + W_{ij} @ B_i + B_i`` for the ``r x r`` tiles of the float32 weight."""
        return self.apply_weight_rows(weight, 0, weight.shape[0], None)

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int, cache: dict | None) -> torch.Tensor:
        """Rows ``r0:r1``: row ``p`` (row ``p mod r`` of tile row ``i = p // r``) becomes, in every ``r``-wide
        chunk ``w``, ``w + w @ B_i + B_i[p mod r]``."""
        r = self.rank
        p = torch.arange(r0, r1)
        blocks = f32(self.block)[p // r]  # (n, r, r): the block of each row's tile row
        chunks = rows.reshape(r1 - r0, -1, r)  # (n, in / r, r)
        new = chunks + chunks @ blocks + blocks[torch.arange(r1 - r0), p % r][:, None, :]
        return new.reshape(rows.shape)
