"""LoRA: ``dW = scale * up @ down`` for linear, conv (incl. a Tucker ``mid`` core) and embedding layers.

Covers PEFT LoRA (incl. rsLoRA, DoRA magnitude, ``lora_B.bias``), kohya/LyCORIS LoCon
(``lora_down``/``lora_mid``/``lora_up`` + ``alpha``) and diffusers LoRA. Factors are kept in the math
orientation: ``up`` is ``(out, r[, 1...])``, ``down`` is ``(r, in[, *k])``; for embeddings ``out`` is
the embedding dim and ``in`` the vocabulary (PEFT's ``lora_embedding_B``/``lora_embedding_A``), and
``fan_in_fan_out`` is true because ``nn.Embedding`` stores the transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .base import DeltaMixin, check_floating, f32, lora_scale, math_shape


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class LoRA(DeltaMixin):
    """One LoRA layer.

    Args:
        down: ``(r, in)`` or, for conv, ``(r, in, *k)`` (``(r, in, 1, ...)`` when ``mid`` is given).
        up: ``(out, r)`` or ``(out, r, 1, ...)``.
        alpha: LoRA alpha of this layer.
        shape: shape of the adapted module's weight (module orientation).
        module_type: ``"linear"``, ``"conv"`` or ``"embedding"``.
        fan_in_fan_out: module weight is the transpose of the math orientation (``Conv1D``, embeddings).
        rslora: scale is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        mid: Tucker core ``(r, r, *k)`` (LyCORIS ``lora_mid``), or ``None``.
        magnitude: DoRA magnitude (1-D), or ``None``.
        magnitude_axis: 0 when ``magnitude`` is per output feature (PEFT), 1 per input feature.
        bias: LoRA bias ``(out,)`` (PEFT ``lora_B.bias``), scaled like the weight, or ``None``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    shape: tuple[int, ...]
    module_type: str = "linear"
    fan_in_fan_out: bool = False
    rslora: bool = False
    mid: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: int = 0
    bias: torch.Tensor | None = None

    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        check_floating(self)
        if self.down.ndim < 2 or self.up.ndim < 2:
            raise ShapeMismatchError(f"LoRA factors down {tuple(self.down.shape)} / up {tuple(self.up.shape)} need at "
                                     "least 2 dimensions each")
        r = self.down.shape[0]
        if r == 0:
            raise ShapeMismatchError(f"LoRA factor down/A has shape {tuple(self.down.shape)}: rank 0, so alpha / r is "
                                     "undefined; drop the layer or give it a positive rank")
        if any(s != 1 for s in self.up.shape[2:]):
            raise ShapeMismatchError(f"LoRA factor up/B has shape {tuple(self.up.shape)}; it must be (out, r), or "
                                     "(out, r, 1, ...) for a convolution")
        if self.up.shape[1] != r:
            raise ShapeMismatchError(
                f"LoRA factors disagree on the rank: down/A has rank {r} but up/B has {self.up.shape[1]}; "
                "the checkpoint is inconsistent"
            )
        if self.mid is not None and tuple(self.mid.shape[:2]) != (r, r):
            raise ShapeMismatchError(f"LoRA Tucker core has shape {tuple(self.mid.shape)}, expected ({r}, {r}, ...)")
        ms = math_shape(tuple(self.shape), self.fan_in_fan_out)
        if ms[0] != self.up.shape[0] or math.prod(ms[1:]) != self._in_numel():
            raise ShapeMismatchError(
                f"LoRA factors up {tuple(self.up.shape)} / down {tuple(self.down.shape)} do not fit a weight of "
                f"shape {tuple(self.shape)}"
            )
        if self.magnitude is not None and self.magnitude.numel() != ms[self.magnitude_axis]:
            raise ShapeMismatchError(
                f"DoRA magnitude has {self.magnitude.numel()} entries, the weight has {ms[self.magnitude_axis]} "
                f"along axis {self.magnitude_axis}"
            )

    def _in_numel(self) -> int:
        n = math.prod(self.down.shape[1:])
        if self.mid is not None:
            n *= math.prod(self.mid.shape[2:])
        return n

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 ``(U, V)`` with ``U @ V`` the math-oriented delta flattened to ``(out, in*k)``.

        ``U`` carries the scale; a Tucker core is folded into ``V`` (same rank, exact).
        """
        up = f32(self.up).reshape(self.up.shape[0], self.rank) * self.scale
        if self.mid is None:
            down = f32(self.down).reshape(self.rank, -1)
        else:
            d = f32(self.down).reshape(self.rank, -1)  # (r, in)
            v = torch.einsum("ab...,bi->ai...", f32(self.mid), d)  # (r, in, *k)
            down = v.reshape(self.rank, -1)
        return up, down

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation ``(out, in, *k)``."""
        u, v = self.factors()
        return (u @ v).reshape(math_shape(tuple(self.shape), self.fan_in_fan_out))

    def delta_bias(self) -> torch.Tensor | None:
        """``scale * bias`` or ``None``."""
        return None if self.bias is None else f32(self.bias) * self.scale
