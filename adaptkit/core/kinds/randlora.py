"""RandLoRA: full-rank updates from shared random bases, ``dW = scale * B_flat @ (lambda * A * gamma)_flat``.

PEFT (``tuners/randlora``) keeps one shared pair ``randlora_A (r, 1, min_dim)`` / ``randlora_B (max_dim,
n_bases, r)`` (``base_model.randlora_A.<adapter>``); each layer has ``randlora_lambda (r, n_bases)`` and
``randlora_gamma (n_bases, min(in, out))``, with ``n_bases = ceil(min(in, out) / r)``. Gotchas:

* The trainable scalings always sit on the *smaller* side: when ``in <= out`` the delta is
  ``B[:out] @ A'`` and otherwise its transpose ``(B[:in] @ A')^T`` (peft's ``get_scaled_bases``).
* ``B`` is flattened ``(max_dim, n_bases * r)`` in ``(basis, r)`` order while ``A' = lambda[:, :, None] * A *
  gamma`` is flattened ``(r * n_bases, min_dim)`` in ``(r, basis)`` order; peft multiplies the two as they
  are, and so does this kind (the orders do not correspond, which is harmless for a random basis).
* ``scale = randlora_alpha / r``; the projections are saved only with ``save_projection=True`` (the
  default), refused otherwise as for VeRA (:func:`adaptkit.core.kinds.vera.require_projections`).
* ``Conv1D`` uses ``fan_in_fan_out``; in and out are then the math orientation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, math_shape


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class RandLoRA(AdditiveKind):
    """One RandLoRA layer.

    Args:
        randlora_a: the shared ``randlora_A`` ``(r, 1, max_min_dim)``.
        randlora_b: the shared ``randlora_B`` ``(max_max_dim, max_bases, r)``.
        lam: ``randlora_lambda`` ``(r, n_bases)``.
        gamma: ``randlora_gamma`` ``(n_bases, min(in, out))``.
        alpha: ``randlora_alpha``.
        shape: module weight shape (module orientation); ``None`` when read from a PEFT file, which does not say
            which side is the larger (``fit`` with the base's shape fills it).
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
    """

    randlora_a: torch.Tensor
    randlora_b: torch.Tensor
    lam: torch.Tensor
    gamma: torch.Tensor
    alpha: float
    shape: tuple[int, ...] | None
    fan_in_fan_out: bool = False
    module_type: str = "linear"

    kind: ClassVar[str] = "randlora"

    def __post_init__(self) -> None:
        check_floating(self)
        if self.shape is None:
            return  # read from a PEFT file; fit() gives the shape and runs these checks
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        r, nb = (self.lam.shape if self.lam.ndim == 2 else (0, 0))
        lo, hi = min(out, inp), max(out, inp)
        if (self.lam.ndim != 2 or tuple(self.gamma.shape) != (nb, lo) or self.randlora_a.ndim != 3
                or self.randlora_b.ndim != 3 or self.randlora_a.shape[0] != r or self.randlora_a.shape[2] < lo
                or self.randlora_b.shape[0] < hi or self.randlora_b.shape[1] < nb or self.randlora_b.shape[2] != r):
            raise ShapeMismatchError(
                f"RandLoRA tensors lambda {tuple(self.lam.shape)}, gamma {tuple(self.gamma.shape)}, randlora_A "
                f"{tuple(self.randlora_a.shape)}, randlora_B {tuple(self.randlora_b.shape)} do not fit a weight of "
                f"shape {tuple(self.shape)}; the shared bases may belong to another adapter"
            )

    @property
    def rank(self) -> int:
        """``r`` (the rank of one basis; the update has rank up to ``r * n_bases``)."""
        return int(self.lam.shape[0])

    @property
    def scale(self) -> float:
        """``randlora_alpha / r``."""
        return self.alpha / self.rank

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype``, rank ``r * n_bases`` (exact), with the scale folded into ``U``."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        lo, hi = min(out, inp), max(out, inp)
        nb = self.lam.shape[1]
        a = self.randlora_a.to(dtype)[:, :nb, :lo]  # (r, 1, lo) broadcasts over the bases
        scaled_a = (self.lam.to(dtype)[:, :, None] * a * self.gamma.to(dtype)[None]).flatten(0, 1)  # (r * nb, lo)
        b = self.randlora_b.to(dtype)[:hi, :nb, :].flatten(1)  # (hi, nb * r)
        if lo == inp:  # delta (out, in) = B[:out] @ A'
            return b * self.scale, scaled_a
        return scaled_a.T * self.scale, b.T  # delta = (B[:in] @ A')^T

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        u, v = self.factors()
        return u @ v
