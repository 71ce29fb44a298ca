"""IA3: a learned vector that rescales a layer's outputs (``W' = diag(l) W``, bias too) or inputs (``W' = W diag(l)``).

IA3 is multiplicative, so it has no base-free delta: use :meth:`IA3.apply`. PEFT stores ``ia3_l`` of shape
``(out, 1)`` / ``(1, in)`` (conv: ``(1, n, 1, 1)``); LyCORIS stores ``weight`` as ``l - 1`` with
``on_input``. The canonical vector is the multiplier ``l`` itself, 1-D.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from .base import Layer, check_floating, f32, layer_dtype, math_shape
from .common import KindBase, conv_or_linear


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class IA3(KindBase):
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
    has_delta: ClassVar[bool] = False
    dora: ClassVar[bool] = False
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

    @classmethod
    def operations(cls) -> dict[str, str]:
        """IA3 rescales the weight: fused exactly, never subtracted, merged in its own vectors (PEFT's linear)."""
        return {"fuse": "exact", "unfuse": "refused: rescales the weight (a zero multiplier loses it)",
                "merge": "exact (weighted sum of the vectors)", "lora": "needs base"}

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """IA3 cannot be unfused reliably (a zero multiplier loses the weight); always raises."""
        raise UnsupportedError("IA3 rescales the weight and cannot be subtracted again; fuse into a copy instead")

    @property
    def rowwise(self) -> bool:
        """Row blocks of the module weight can be rescaled independently (not for a transposed ``Conv1D`` weight)."""
        return not self.fan_in_fan_out

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` times ``1 + weight * (l - 1)`` along the output (rows) or input (dim 1) axis, in place."""
        scale = 1.0 + weight * (f32(self.vector) - 1.0)
        view = [1] * rows.ndim
        view[1 if self.on_input else 0] = -1
        return rows.mul_((scale if self.on_input else scale[r0:r1]).view(view))

    def io_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(l, None)`` when scaling the inputs, ``(None, l)`` when scaling the outputs."""
        return (self.vector, None) if self.on_input else (None, self.vector)

    def delta_matrix(self) -> torch.Tensor:
        """IA3 has no base-free delta; always raises :class:`UnsupportedError`."""
        return self.delta()

    def delta_bias(self) -> torch.Tensor | None:
        """IA3 has no base-free bias change; always raises :class:`UnsupportedError`."""
        return self.delta()

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """Take the module's weight shape (IA3 stores none) and, for a live module, its orientation and side.

        Raises:
            ShapeMismatchError: (``module`` given) another weight shape is recorded, the module is an embedding,
                or the vector fits neither side.
        """
        w_shape = tuple(int(s) for s in shape)
        if module is None:
            return dataclasses.replace(self, shape=w_shape, module_type=conv_or_linear(w_shape)) if w_shape else self
        if self.shape is not None and tuple(self.shape) != w_shape:
            raise ShapeMismatchError(f"IA3 layer for weight {tuple(self.shape)} does not fit weight {w_shape}")
        if module == "embedding":
            raise ShapeMismatchError("IA3 cannot adapt an embedding")
        on_input = self.on_input
        if module == "conv" and not on_input and self.vector.numel() != w_shape[0] and self.vector.numel() == w_shape[1]:
            on_input = True  # a raw PEFT conv vector (1, C, 1, 1) does not say which side it scales
        return dataclasses.replace(self, shape=w_shape, fan_in_fan_out=module == "conv1d", on_input=on_input,
                                   module_type="conv" if module == "conv" else "linear")

    def update_vector(self) -> torch.Tensor:
        """``l - 1`` in float64: the change IA3 makes, relative to leaving the features as they are."""
        return self.vector.double() - 1

    def note(self) -> str:
        """The side it scales and the statistics of the multiplier (IA3 rows carry no delta statistics)."""
        v = self.vector.double()
        side = "input" if self.on_input else "output"
        return (f"IA3 ({side} scaling): no base-free dW; multiplier l: mean {float(v.mean()):.4g}, "
                f"min {float(v.min()):.4g}, max {float(v.max()):.4g}, ||l-1|| {float(torch.linalg.vector_norm(v - 1)):.4g}")

    def lora_obstacle(self) -> str:
        """IA3 is multiplicative: its LoRA form needs the base weights."""
        return "IA3 rescales the base weight, so its LoRA form needs the base weights (fuse it instead)"

    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """Always raises :class:`UnsupportedError` (see :meth:`lora_obstacle`)."""
        raise UnsupportedError(f"an IA3 layer cannot become LoRA: {self.lora_obstacle()}")

    @classmethod
    def weighted_sum(cls, layers: list[Layer], weights: list[float]) -> IA3:
        """PEFT's IA3 merge: the weighted sum of the vectors (the layers scale the same side of one module).

        Raises:
            ShapeMismatchError: the layers scale different sides, or their vectors differ in length.
        """
        first = layers[0]
        if len({layer.on_input for layer in layers}) > 1:
            raise ShapeMismatchError("the layers scale inputs in one adapter and outputs in another "
                                     "(feedforward_modules differ); such IA3 vectors cannot be summed")
        if len({layer.vector.numel() for layer in layers}) > 1:
            raise ShapeMismatchError("the IA3 vectors have different lengths; the adapters are for different models")
        vector = sum(w * f32(layer.vector) for layer, w in zip(layers, weights)).to(layer_dtype(first))
        return cls(vector=vector, on_input=first.on_input, shape=first.shape, module_type=first.module_type,
                   fan_in_fan_out=first.fan_in_fan_out)
