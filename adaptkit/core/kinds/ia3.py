"""IA3: a learned vector that rescales a layer's outputs (``W' = diag(l) W``, bias too) or inputs (``W' = W diag(l)``).

IA3 is multiplicative, so it has no base-free delta: use :meth:`IA3.apply`. PEFT stores ``ia3_l`` of shape
``(out, 1)`` / ``(1, in)`` (conv: ``(1, n, 1, 1)``); LyCORIS stores ``weight`` as ``l - 1`` with
``on_input``. The canonical vector is the multiplier ``l`` itself, 1-D.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .base import LayerRepr, check_floating, f32, math_shape


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class IA3(LayerRepr):
    """One IA3 layer.

    Args:
        vector: the multiplier ``l`` (1-D).
        on_input: scale the input features (PEFT ``feedforward_modules``) instead of the outputs.
        shape: module weight shape when known, else ``None`` (a vector alone does not fix it).
        module_type: ``"linear"`` or ``"conv"``.
        fan_in_fan_out: module weight is the transpose of the math orientation (``Conv1D``).
        scale_bias: output scaling also scales the module's bias (PEFT); LyCORIS leaves the bias as it is.
    """

    vector: torch.Tensor
    on_input: bool = False
    shape: tuple[int, ...] | None = None
    module_type: str = "linear"
    fan_in_fan_out: bool = False
    scale_bias: bool = True

    kind: ClassVar[str] = "ia3"
    additive: ClassVar[bool] = False
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        check_floating(self)
        if self.vector.ndim != 1:
            raise ShapeMismatchError(f"IA3 vector must be 1-D, got shape {tuple(self.vector.shape)}")
        if self.shape is not None:
            ms = math_shape(tuple(self.shape), self.fan_in_fan_out)
            axis = 1 if self.on_input else 0
            if ms[axis] != self.vector.numel():
                raise ShapeMismatchError(
                    f"IA3 vector has {self.vector.numel()} entries but the weight {tuple(self.shape)} has "
                    f"{ms[axis]} {'input' if self.on_input else 'output'} features"
                )

    def delta(self) -> torch.Tensor:
        """IA3 has no base-free delta; always raises :class:`UnsupportedError`."""
        raise UnsupportedError("IA3 is multiplicative and has no delta without the base weight; use apply(W)")

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        """``apply(W) - W``: the change IA3 makes to a given base weight (float32)."""
        return self.apply(weight)[0] - f32(weight)

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the rescaled ``(weight, bias)`` in float32 (as PEFT's IA3 ``merge``)."""
        w = f32(weight)
        w_math = w.T if self.fan_in_fan_out else w
        view = [1] * w_math.ndim
        view[1 if self.on_input else 0] = -1
        if w_math.shape[1 if self.on_input else 0] != self.vector.numel():
            raise ShapeMismatchError(
                f"IA3 vector of {self.vector.numel()} entries does not fit a weight of shape {tuple(weight.shape)}"
            )
        out = w_math * f32(self.vector).view(view)
        out = out.T if self.fan_in_fan_out else out
        return out, self.apply_bias(bias)

    @property
    def changes_bias(self) -> bool:
        """True when :meth:`apply` rescales the module's bias: output scaling with ``scale_bias`` (PEFT).

        Input scaling never touches the bias, and LyCORIS's output scaling (``scale_bias=False``) leaves it too.
        """
        return not self.on_input and self.scale_bias

    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The module bias after :meth:`apply`, in float32 (``None`` stays ``None``: there is nothing to scale)."""
        if bias is None:
            return None
        return f32(bias) * f32(self.vector) if self.changes_bias else f32(bias)

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """IA3 cannot be unfused reliably (a zero multiplier loses the weight); always raises."""
        raise UnsupportedError("IA3 rescales the weight and cannot be subtracted again; fuse into a copy instead")
