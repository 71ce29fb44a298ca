"""VeRA: shared frozen random projections, per-layer scaling vectors: ``dW = (lambda_b * B) @ (lambda_d * A)``.

PEFT (``tuners/vera``) keeps one pair ``vera_A (r, max_in)`` / ``vera_B (max_out, r)`` for the whole model
(``base_model.vera_A.<adapter>``); every layer slices ``A[:, :in]`` and ``B[:out, :]``. Gotchas:

* The projections are in the file only with ``save_projection=True`` (the default). Without them they would
  have to be regenerated from ``projection_prng_key`` with peft's own kaiming init on a CPU generator;
  adaptkit does not regenerate them (:func:`require_projections` refuses, naming the fix).
* Only ``nn.Linear`` and ``Conv1D`` (``fan_in_fan_out``) are supported by peft; there is no scale or alpha.
* Layers hold the *shared* tensors (the same tensor objects), sliced on use, so the model-level pair is
  written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .additive import AdditiveKind
from .base import check_floating, math_shape


def require_projections(vera_a: torch.Tensor | None, vera_b: torch.Tensor | None, kind: str = "VeRA") -> None:
    """Refuse an adapter saved without its shared random projections (``save_projection=False``).

    Raises:
        UnsupportedError: a projection is missing.
    """
    if vera_a is None or vera_b is None:
        raise UnsupportedError(f"this {kind} adapter was saved without its shared projections (save_projection=False), "
                               "so its weights cannot be computed from the file; re-save it with save_projection=True")


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class VeRA(AdditiveKind):
    """One VeRA layer.

    Args:
        vera_a: the shared ``vera_A`` ``(r, max_in)``.
        vera_b: the shared ``vera_B`` ``(max_out, r)``.
        lambda_b: ``vera_lambda_b`` ``(out,)``.
        lambda_d: ``vera_lambda_d`` ``(r,)``.
        shape: module weight shape (module orientation); ``None`` when read from a PEFT file, which does not say
            ``in`` (``fit`` with the base's shape fills it).
        fan_in_fan_out: the module stores the transpose (``Conv1D``).
    """

    vera_a: torch.Tensor
    vera_b: torch.Tensor
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    shape: tuple[int, ...] | None
    fan_in_fan_out: bool = False
    module_type: str = "linear"

    kind: ClassVar[str] = "vera"
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        if self.shape is None:
            return  # read from a PEFT file; fit() gives the shape and runs these checks
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        r = self.lambda_d.numel()
        if self.lambda_b.ndim != 1 or self.lambda_d.ndim != 1 or self.lambda_b.numel() != out:
            raise ShapeMismatchError(f"VeRA lambda_b {tuple(self.lambda_b.shape)} / lambda_d {tuple(self.lambda_d.shape)} "
                                     f"must be 1-D, lambda_b as long as the {out} output features")
        if (self.vera_a.ndim != 2 or self.vera_b.ndim != 2 or self.vera_a.shape[0] < r or self.vera_b.shape[1] < r
                or self.vera_a.shape[1] < inp or self.vera_b.shape[0] < out):
            raise ShapeMismatchError(f"VeRA projections vera_A {tuple(self.vera_a.shape)} / vera_B "
                                     f"{tuple(self.vera_b.shape)} are smaller than this layer needs (r={r}, in={inp}, "
                                     f"out={out}); the shared projections do not belong to this adapter")

    @property
    def rank(self) -> int:
        """``r``, the length of ``lambda_d``."""
        return int(self.lambda_d.numel())

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` = ``(lambda_b * B[:out, :r], lambda_d * A[:r, :in])`` in ``dtype`` (exact, rank ``r``)."""
        out, inp = math_shape(self.shape, self.fan_in_fan_out)
        r = self.rank
        u = self.lambda_b.to(dtype)[:, None] * self.vera_b.to(dtype)[:out, :r]
        v = self.lambda_d.to(dtype)[:, None] * self.vera_a.to(dtype)[:r, :inp]
        return u, v

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation."""
        u, v = self.factors()
        return u @ v
