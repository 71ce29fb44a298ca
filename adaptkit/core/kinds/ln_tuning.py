"""LN tuning (PEFT ``ln_tuning_layers``): a tuned copy of a norm layer that *replaces* its weight and bias.

PEFT (``tuners/ln_tuning``) deep-copies each target norm module and trains the copy; ``merge`` swaps the
copy in. The file holds ``<path>.ln_tuning_layers.weight`` (and ``.bias`` where the norm has one). The new
values do not depend on the old ones, but the *change* does, so the kind is base-dependent: ``additive`` is
False, ``delta()`` raises, ``apply(W, b)`` returns the stored tensors (``delta_for(W)`` gives the change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .base import check_floating, f32
from .basedep import BaseDependent


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class LNTuning(BaseDependent):
    """One tuned norm layer.

    Args:
        shape: the norm weight's shape.
        weight: the tuned norm weight, or ``None`` when only the bias is tuned (the weight stays).
        bias: the tuned bias, or ``None``.
    """

    shape: tuple[int, ...]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    module_type: str = "norm"

    kind: ClassVar[str] = "ln_tuning"
    effect: ClassVar[str] = "replaces the norm layer's weight and bias"
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        if self.weight is None and self.bias is None:
            raise ShapeMismatchError("an LN tuning layer needs a tuned weight or bias; the checkpoint holds neither")
        if self.weight is not None and tuple(self.weight.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"LN tuning weight has shape {tuple(self.weight.shape)}, expected {tuple(self.shape)}")

    @property
    def changes_bias(self) -> bool:  # type: ignore[override]
        """True when a tuned bias is stored."""
        return self.bias is not None

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The tuned weight (float32), or the base weight when only the bias is tuned."""
        return weight if self.weight is None else f32(self.weight).clone()

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tuned ``(weight, bias)`` (float32); with ``bias=None`` only the weight (fuse applies the bias on its own;
        :meth:`apply_bias` refuses a stored bias for a module without one)."""
        self.check_weight(weight)
        return self.apply_weight(f32(weight)), None if bias is None else self.apply_bias(bias)

    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The tuned bias (float32), or the module's own.

        Raises:
            UnsupportedError: a bias is stored but the module has none.
        """
        if self.bias is None:
            return None if bias is None else f32(bias)
        if bias is None:
            raise UnsupportedError("this LN tuning layer replaces a bias but the norm module has none; check the base model")
        if bias.shape != self.bias.shape:
            raise ShapeMismatchError(f"LN tuning bias has shape {tuple(self.bias.shape)}, the module's {tuple(bias.shape)}")
        return f32(self.bias).clone()
