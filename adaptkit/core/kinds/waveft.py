"""WaveFT: sparse wavelet coefficients, ``dW = idwt2(S) * scaling`` (or ``S * scaling`` without the transform).

PEFT (``tuners/waveft``) saves only ``waveft_spectrum (n,)``. Gotchas:

* As for FourierFT, the positions are **not saved**: they are drawn from ``random_loc_seed`` exactly like
  FourierFT's (:func:`adaptkit.core.kinds.positions.seeded_positions`).
* With ``use_idwt`` (the default) the coefficient matrix is padded by the wavelet's reduction
  (``WAVELET_REDUCTIONS[family]``, then up to even sizes), the positions shifted to its centre, split into
  the four quadrants ``(cA, (cH, cV, cD))``, reconstructed with one level of the inverse 2-D DWT and cropped
  back to ``(out, in)`` around the centre. The wavelet synthesis itself is peft's own (``waverec2d``,
  imported at run time: adaptkit keeps no wavelet filter tables), so ``use_idwt=True`` layers need peft.
* Without ``use_idwt`` the delta is the scattered coefficients times ``scaling``.
* Math orientation in ``get_delta_weight`` (``merge`` transposes for ``Conv1D``), as FourierFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape
from .positions import check_positions, seeded_positions


def _wavelet_tools():
    try:
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
        from peft.tuners.waveft.waverec2d import waverec2d
    except ImportError as e:  # pragma: no cover - peft is installed wherever these kinds are read
        raise UnsupportedError("a WaveFT layer with use_idwt=True needs peft's inverse wavelet transform; install "
                               "peft (pip install peft)") from e
    return WAVELET_REDUCTIONS, waverec2d


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class WaveFT(AdditiveKind):
    """One WaveFT layer.

    Args:
        values: ``waveft_spectrum`` ``(n,)``, the learned wavelet coefficients.
        indices: ``(2, n)`` integer positions, or ``None``: drawn from ``random_loc_seed`` once the shape is known
            (a PEFT file holds neither; :meth:`fit` takes the base's shape).
        scaling: the config's ``scaling``.
        shape: module weight shape (module orientation).
        wavelet_family: the config's ``wavelet_family`` (``"db1"``, ``"sym4"``, ...).
        use_idwt: reconstruct with the inverse wavelet transform (peft's default) instead of using the
            coefficients as the delta.
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
        random_loc_seed: the config's seed the positions are drawn from (``None``: positions given).
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    scaling: float
    shape: tuple[int, ...] | None
    wavelet_family: str = "db1"
    use_idwt: bool = True
    fan_in_fan_out: bool = False
    module_type: str = "linear"
    random_loc_seed: int | None = None

    kind: ClassVar[str] = "waveft"
    index_parts: ClassVar[frozenset[str]] = frozenset({"indices"})
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self, self.index_parts)
        if self.indices is None:
            if self.random_loc_seed is None:
                raise ShapeMismatchError("a WaveFT layer needs its positions or the random_loc_seed they are drawn from")
            if self.shape is None:  # a PEFT file holds neither the shape nor the positions: fit(shape) draws them
                if self.values.ndim != 1:
                    raise ShapeMismatchError(f"WaveFT waveft_spectrum has shape {tuple(self.values.shape)}; it must be (n,)")
                return
            out, inp = math_shape(tuple(self.shape), self.fan_in_fan_out)
            if self.values.numel() > out * inp:
                raise ShapeMismatchError(f"WaveFT has {self.values.numel()} coefficients, more than a ({out}, {inp}) weight "
                                         "has entries; the adapter was made for another model")
            object.__setattr__(self, "indices", seeded_positions(out, inp, self.values.numel(), self.random_loc_seed))
        if self.shape is None:
            raise ShapeMismatchError("a WaveFT layer with positions needs the weight shape they index")
        check_positions("WaveFT", self.values, self.indices, *math_shape(tuple(self.shape), self.fan_in_fan_out))

    @property
    def scale(self) -> float:
        """The config's ``scaling``."""
        return float(self.scaling)

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``."""
        out, inp = math_shape(tuple(self.shape), self.fan_in_fan_out)
        coefficients = f32(self.values)
        idx = self.indices.long()
        if not self.use_idwt:
            dense = torch.zeros(out, inp, dtype=torch.float32)
            dense[idx[0], idx[1]] = coefficients
            return dense * self.scale
        reductions, waverec2d = _wavelet_tools()
        if self.wavelet_family not in reductions:
            raise UnsupportedError(f"unknown WaveFT wavelet family '{self.wavelet_family}'; peft knows "
                                   f"{', '.join(sorted(reductions))}")
        extra_rows, extra_cols = reductions[self.wavelet_family]
        rows, cols = out + extra_rows, inp + extra_cols
        rows += rows % 2
        cols += cols % 2
        dense = torch.zeros(rows, cols, dtype=torch.float32)
        dense[idx[0] + (rows - out) // 2, idx[1] + (cols - inp) // 2] = coefficients
        h, w = rows // 2, cols // 2
        coeffs = (dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:]))
        full = waverec2d(coeffs, self.wavelet_family) * self.scale
        r0, c0 = (full.shape[0] - out) // 2, (full.shape[1] - inp) // 2
        return full[r0:r0 + out, c0:c0 + inp]
