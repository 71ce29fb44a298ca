"""Kinds whose effect depends on the base weight: the shared protocol members (no base-free delta).

Multiplicative kinds (OFT, BOFT, HRA, LyCORIS diag-OFT/BOFT), kinds that mix the base into the update
(GLoRA's ``W·A``, MiSS "bat") and replacement kinds (LN tuning, trainable tokens) have no base-free weight
delta: ``additive`` and ``has_delta`` are False, :meth:`BaseDependent.delta` raises and says to use ``apply``
with the base, exactly as IA3 does; norms are NaN, spectra raise, and the LoRA form needs the base weight.
A kind provides ``apply_weight(weight_f32)`` (module orientation in, module orientation out) and, when its
output rows depend only on the same rows of ``W`` (rotations of the input features, replaced rows),
``rowwise = True`` and ``apply_weight_rows``; when it changes the bias it overrides ``apply_bias``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .base import Layer, f32
from .common import KindBase

#: why a base-dependent layer has no LoRA form from the adapter file alone (convert asks for the base)
NEEDS_BASE = "needs the base weight: pass --base (base= in Python)"


def cached(cache: dict | None, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``cache[key]``, made with ``make()`` the first time (every call when there is no cache)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


class NoBaseFreeDelta(KindBase):
    """The delta members of a kind that has no weight delta without the base tensor: each raises and says why."""

    def _no_delta_message(self) -> str:
        return (f"a {self.kind} layer changes the weight as a function of the base weight and has no "
                "delta without it; use apply(W) (or delta_for(W)) with the base weight")

    def _no_delta(self) -> torch.Tensor:
        raise UnsupportedError(self._no_delta_message())

    def delta(self) -> torch.Tensor:
        """No base-free delta; always raises :class:`UnsupportedError`."""
        return self._no_delta()

    def delta_matrix(self) -> torch.Tensor:
        """No base-free delta; always raises :class:`UnsupportedError`."""
        return self._no_delta()

    def delta_bias(self) -> torch.Tensor | None:
        """No base-free bias change; always raises :class:`UnsupportedError` (the bias goes through ``apply_bias``)."""
        return self._no_delta()


class BaseDependent(NoBaseFreeDelta):
    """Protocol members for a kind whose fused weight is a function of the base weight (not ``W + delta``)."""

    additive: ClassVar[bool] = False
    has_delta: ClassVar[bool] = False
    dora: ClassVar[bool] = False
    changes_bias: ClassVar[bool] = False
    rowwise: ClassVar[bool] = False
    #: these kinds act on the module orientation of nn.Linear / nn.Conv / nn.Embedding weights (no Conv1D)
    fan_in_fan_out: ClassVar[bool] = False
    #: the update's strength lives in the kind's tensors (GLoRA overrides it with alpha / r)
    scale: ClassVar[float] = 1.0
    #: what the layer does to the base weight, for analysis notes
    effect: ClassVar[str] = "changes the weight as a function of the base weight"

    @classmethod
    def operations(cls) -> dict[str, str]:
        """Fused exactly against the base weight; no unfuse, no merge, and the LoRA form needs the base."""
        return {"fuse": "exact", "unfuse": "refused: the base cannot be recovered from the fused weight",
                "merge": "refused: depends on the base weight", "lora": "needs base"}

    # ------------------------------------------------------------------ applying to the base

    def apply_weight(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every kind overrides it
        """The adapted weight (float32, module orientation) for a float32 base weight."""
        raise NotImplementedError

    def apply_weight_rows(self, rows: torch.Tensor, r0: int, r1: int,
                          cache: dict | None) -> torch.Tensor:  # pragma: no cover - rowwise kinds override it
        """The adapted rows ``r0:r1`` (float32) of the module weight (``rowwise`` kinds implement it)."""
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
        """Return the adapted ``(weight, bias)`` in float32 (as PEFT's / LyCORIS's ``merge``).

        Raises:
            ShapeMismatchError: ``weight`` does not have the layer's shape.
        """
        self.check_weight(weight)
        return self.apply_weight(f32(weight)), self.apply_bias(bias)

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``W + weight * (apply(W) - W)`` (float32), for ``rowwise`` kinds.

        Raises:
            UnsupportedError: the kind is not ``rowwise`` (its rows depend on other rows of ``W``).
        """
        if not self.rowwise:
            raise UnsupportedError(f"a {self.kind} layer mixes the rows of the weight and is not applied row by row; "
                                   "use apply()")
        new = self.apply_weight_rows(f32(rows), r0, r1, cache)
        if weight == 1.0:
            return new
        return rows.add_(new - rows, alpha=weight)

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

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Always raises: the base weight cannot be recovered reliably from the fused one."""
        raise UnsupportedError(f"a {self.kind} layer cannot be unfused from the fused weight alone; fuse into a copy of "
                               "the base weights instead")

    # ------------------------------------------------------------------ fitting to a module

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """The layer for a module weight of ``shape``; ``module`` is the live module's kind, or ``None``.

        With ``module=None`` (a reader that knows only the base's weight shapes) a layer without a shape takes
        it and any other is returned as it is (``apply`` checks the shape). With a module the fit is strict.

        Raises:
            ShapeMismatchError: (strict) another weight shape, a transformers ``Conv1D`` (these kinds act on
                the math orientation, which a ``Conv1D`` stores transposed), or an embedding for a kind that
                adapts no embedding.
        """
        w_shape = tuple(int(s) for s in shape)
        if self.shape is None:
            return dataclasses.replace(self, shape=w_shape) if w_shape else self
        if module is None:
            return self
        own = tuple(self.shape)
        if module == "conv1d":
            raise ShapeMismatchError(f"a {self.kind} layer cannot adapt a transformers Conv1D (weight {w_shape}, "
                                     "stored transposed); only nn.Linear, nn.Conv and nn.Embedding weights")
        if module == "embedding" and self.module_type != "embedding":
            raise ShapeMismatchError(f"a {self.module_type} {self.kind} layer cannot adapt an embedding {w_shape}")
        if own != w_shape:
            raise ShapeMismatchError(f"{self.kind} layer for weight {own} does not fit weight {w_shape}")
        return self

    # ------------------------------------------------------------------ analysis and conversion

    def note(self) -> str:
        """What the layer does (analysis rows carry no delta statistics for it)."""
        return f"{self.kind}: {self.effect}; no base-free dW (statistics need the base weight)"

    def lora_obstacle(self) -> str:
        """The LoRA form of a base-dependent layer is a function of the base weight."""
        return f"{self.effect}, so its LoRA form {NEEDS_BASE}"

    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """Always raises :class:`UnsupportedError` (see :meth:`lora_obstacle`)."""
        raise UnsupportedError(f"a {self.kind} layer cannot become LoRA from the adapter alone: {self.lora_obstacle()}")

    @classmethod
    def weighted_sum(cls, layers: list[Layer], weights: list[float]) -> Layer:
        """Base-dependent layers have neither a delta to merge through nor a merge in their own parameters."""
        raise UnsupportedError(f"{cls.kind} layers depend on the base weight and cannot be merged with others; fuse "
                               "each into the base weights in turn instead")


__all__ = ["NEEDS_BASE", "BaseDependent", "cached"]
