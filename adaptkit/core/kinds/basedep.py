"""Kinds whose effect depends on the base weight: the shared ``delta``/``apply``/``unapply`` behaviour.

Multiplicative kinds (OFT, BOFT, HRA, LyCORIS diag-OFT/BOFT), kinds that mix the base into the update
(GLoRA's ``W·A``, MiSS "bat") and replacement kinds (LN tuning, trainable tokens) have no base-free weight
delta: ``additive`` is False, :meth:`BaseDependent.delta` raises and says to use ``apply`` with the base,
exactly as IA3 does. A kind provides ``apply_weight(weight_f32)`` (module orientation in, module orientation
out) and, when it changes the bias, overrides ``apply_bias``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .base import LayerRepr, f32


class BaseDependent(LayerRepr):
    """Mixin for a kind whose fused weight is a function of the base weight (not ``W + delta``)."""

    additive: ClassVar[bool] = False
    changes_bias: ClassVar[bool] = False

    def delta(self) -> torch.Tensor:
        """No base-free delta; always raises :class:`UnsupportedError`."""
        raise UnsupportedError(f"a {self.kind} layer changes the weight as a function of the base weight and has no "
                               "delta without it; use apply(W) (or delta_for(W)) with the base weight")

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every kind overrides it
        """The adapted weight (float32, module orientation) for a float32 base weight."""
        raise NotImplementedError

    def check_weight(self, weight: torch.Tensor) -> None:
        """Refuse a base weight whose shape is not the layer's ``shape``.

        Raises:
            ShapeMismatchError: naming both shapes.
        """
        if self.shape is not None and tuple(weight.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"{self.kind} layer was made for a weight of shape {tuple(self.shape)} but got "
                                     f"{tuple(weight.shape)}; pass the base weight of the module it adapts")

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the adapted ``(weight, bias)`` in float32 (as PEFT's ``merge``).

        Raises:
            ShapeMismatchError: ``weight`` does not have the layer's shape.
        """
        self.check_weight(weight)
        return self.apply_weight(f32(weight)), self.apply_bias(bias)

    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The module bias after :meth:`apply`: unchanged (float32) unless the kind overrides it."""
        return None if bias is None else f32(bias)

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        """``apply(W) - W`` for the weight alone: the change this layer makes to a given base weight (float32).

        Raises:
            ShapeMismatchError: ``weight`` does not have the layer's shape.
        """
        self.check_weight(weight)
        w = f32(weight)
        return self.apply_weight(w) - w

    def delta_bias(self) -> torch.Tensor | None:
        """No base-free bias change (a kind that replaces the bias says so through ``apply_bias``)."""
        return None

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Always raises: the base weight cannot be recovered reliably from the fused one."""
        raise UnsupportedError(f"a {self.kind} layer cannot be unfused from the fused weight alone; fuse into a copy of "
                               "the base weights instead")
