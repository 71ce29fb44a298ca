"""FourierFT: a sparse 2-D spectrum, ``dW = real(ifft2(S)) * scaling`` with ``n`` learned entries of ``S``.

PEFT (``tuners/fourierft``) saves only ``fourierft_spectrum (n,)``. Gotchas:

* The spectrum's positions are **not saved**: peft regenerates them as
  ``torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]`` (row ``p // in``,
  column ``p % in``) from the config's ``random_loc_seed`` (default 777).
  :func:`adaptkit.core.kinds.positions.seeded_positions` does the same; a reader needs the config's seed and the layer's ``(out, in)``.
* The dense spectrum is always float32 (``torch.zeros`` default dtype) and the result is cast back to the
  spectrum's dtype.
* ``get_delta_weight`` is in the *math* orientation ``(out, in)`` even for ``Conv1D``: peft's ``merge``
  transposes it with ``fan_in_fan_out``. This kind's ``delta()`` is the module orientation, as for every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape
from .positions import check_positions, seeded_positions


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class FourierFT(AdditiveKind):
    """One FourierFT layer.

    Args:
        values: ``fourierft_spectrum`` ``(n,)``, the learned spectrum entries (``values``, as ``spectrum()`` is
            the protocol's singular values).
        indices: ``(2, n)`` integer (row, column) positions (:func:`~adaptkit.core.kinds.positions.seeded_positions`);
            ``None`` to draw them from ``seed`` once the shape is known (a PEFT file stores neither).
        scaling: the config's ``scaling``.
        shape: module weight shape (module orientation); ``None`` when read from a PEFT file (``fit`` with the
            base's shape fills it and draws the positions).
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
        seed: the ``random_loc_seed`` the positions were drawn from (``None``: unknown, positions given).
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    scaling: float
    shape: tuple[int, ...] | None
    fan_in_fan_out: bool = False
    module_type: str = "linear"
    seed: int | None = None

    kind: ClassVar[str] = "fourierft"
    index_parts: ClassVar[frozenset[str]] = frozenset({"indices"})
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self, self.index_parts)
        if self.indices is None:
            if self.seed is None:
                raise ShapeMismatchError("FourierFT needs its spectrum positions or the random_loc_seed they are drawn from")
            if self.shape is None:
                return  # read from a PEFT file; fit() gives the shape, the positions and these checks
            out, inp = math_shape(self.shape, self.fan_in_fan_out)
            object.__setattr__(self, "indices", seeded_positions(out, inp, self.values.numel(), self.seed))
        check_positions("FourierFT", self.values, self.indices, *math_shape(self.shape, self.fan_in_fan_out))

    @property
    def scale(self) -> float:
        """The config's ``scaling``."""
        return float(self.scaling)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype``, rank ``2 n`` (exact): each spectrum entry ``s`` at ``(p, q)`` adds
        ``s cos(2 pi (i p / out + j q / in)) / (out in)`` to entry ``(i, j)``, a cosine and a sine outer product."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        f64 = torch.float64  # the phases in float64: float32 cosines of large angles are off by ~1e-6
        idx = self.indices.long()
        # the phase of (i, p) is 2 pi (i p mod out) / out: exact integers before the division
        rows = 2 * torch.pi * ((torch.arange(out)[:, None] * idx[0][None, :]) % out).to(f64) / out  # (out, n)
        cols = 2 * torch.pi * ((idx[1][:, None] * torch.arange(inp)[None, :]) % inp).to(f64) / inp  # (n, in)
        weights = self.values.to(f64)[:, None] * (self.scale / (out * inp))
        u = torch.cat([rows.cos(), rows.sin()], dim=1)
        v = torch.cat([weights * cols.cos(), -weights * cols.sin()], dim=0)
        return u.to(dtype), v.to(dtype)

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        dense = torch.zeros(out, inp, dtype=torch.float32)
        idx = self.indices.long()
        dense[idx[0], idx[1]] = f32(self.values)
        return torch.fft.ifft2(dense).real * self.scale
