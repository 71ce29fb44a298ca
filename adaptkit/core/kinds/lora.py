"""LoRA: ``dW = scale * up @ down`` for linear, conv (incl. a Tucker ``mid`` core) and embedding layers.

Covers PEFT LoRA (incl. rsLoRA, DoRA magnitude, ``lora_B.bias``), kohya/LyCORIS LoCon
(``lora_down``/``lora_mid``/``lora_up`` + ``alpha``) and diffusers LoRA. Factors are kept in the math
orientation: ``up`` is ``(out, r[, 1...])``, ``down`` is ``(r, in[, *k])``; for embeddings ``out`` is
the embedding dim and ``in`` the vocabulary (PEFT's ``lora_embedding_B``/``lora_embedding_A``), and
``fan_in_fan_out`` is true because ``nn.Embedding`` stores the transpose.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from ..linalg import gram_energy, lowrank_svd_parts, numerical_rank
from .base import (
    MODULE_TYPES,
    Layer,
    check_floating,
    f32,
    layer_dtype,
    lora_scale,
    math_shape,
)
from .common import DeltaMixin, add_delta_rows, conv_or_linear


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

    @property
    def rowwise(self) -> bool:
        """Without DoRA each output row of ``W + U V`` needs only the same rows: fuse streams row blocks."""
        return not self.dora

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` in ``dtype`` with ``U @ V`` the math-oriented delta flattened to ``(out, in*k)``.

        ``U`` carries the scale; a Tucker core is folded into ``V`` (same rank, exact).
        """
        up = self.up.to(dtype).reshape(self.up.shape[0], self.rank) * self.scale
        if self.mid is None:
            down = self.down.to(dtype).reshape(self.rank, -1)
        else:
            d = self.down.to(dtype).reshape(self.rank, -1)  # (r, in)
            v = torch.einsum("ab...,bi->ai...", self.mid.to(dtype), d)  # (r, in, *k)
            down = v.reshape(self.rank, -1)
        return up, down

    def fro_norm(self) -> float:
        """``||scale * B A||_F`` in float64 from the stored factors' Grams (``|scale|`` applied to the norm, so the
        factors are not rescaled first); a Tucker core or DoRA takes the generic path."""
        if self.mid is not None or not self.has_delta:
            return super().fro_norm()
        up = self.up.reshape(self.up.shape[0], self.rank)
        return abs(self.scale) * math.sqrt(max(gram_energy(up, self.down.reshape(self.rank, -1)), 0.0))

    def lora_ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``B`` as stored (unscaled, float32, ``(out, r)``) and ``A`` (float32 ``(r, in * k)``, a Tucker core folded in)."""
        down = f32(self.down).reshape(self.rank, -1) if self.mid is None else self.factors()[1]
        return f32(self.up).reshape(self.up.shape[0], self.rank), down

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation ``(out, in, *k)``."""
        u, v = self.factors()
        return (u @ v).reshape(math_shape(tuple(self.shape), self.fan_in_fan_out))

    def delta_bias(self) -> torch.Tensor | None:
        """``scale * bias`` or ``None``."""
        return None if self.bias is None else f32(self.bias) * self.scale

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Add ``weight * (U V)`` to rows ``r0:r1`` of the module weight in place (no ``m x n`` delta is built).

        Raises:
            UnsupportedError: the layer has a DoRA magnitude (its rows depend on the whole weight's norm).
        """
        if self.dora:
            raise UnsupportedError("a DoRA layer re-normalises the whole weight and is not applied row by row; use apply()")
        return add_delta_rows(self, rows, r0, r1, weight, cache)

    def _refined(self, shape: tuple[int, ...]) -> Layer:
        """A 1x1 conv stored as linear factors or the other way round: the factors reshaped to the base module."""
        if (self.mid is None and tuple(self.shape) != shape and math.prod(self.shape) == math.prod(shape)
                and all(k == 1 for k in (*self.shape[2:], *shape[2:]))):
            extra = [1] * (len(shape) - 2)
            return dataclasses.replace(self, down=self.down.reshape(self.rank, shape[1], *extra),
                                       up=self.up.reshape(shape[0], self.rank, *extra), shape=shape,
                                       module_type=conv_or_linear(shape))
        return self

    # ------------------------------------------------------------------ LoRA form

    def lora_obstacle(self) -> str | None:
        """Only a per-input DoRA magnitude (LyCORIS ``wd_on_out=False``) has no LoRA form without the base."""
        if self.dora and self.magnitude_axis != 0:
            return "its DoRA magnitude depends on the base weight (fuse it instead)"
        return None

    def keeps_as_lora(self, rank: int | None) -> bool:
        """A plain LoRA (no Tucker core) of rank at most ``rank`` is kept as it is."""
        return self.mid is None and (rank is None or self.rank <= rank)

    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """Kept (``rank`` at least the layer's), the Tucker core folded into ``down`` (exact, same rank), or an
        exact low-rank SVD of ``U V`` (QR of the factors + SVD of the ``r x r`` core) truncated to ``rank``;
        the DoRA magnitude and the bias are carried over."""
        if self.keeps_as_lora(rank):
            return self, 1.0, 0.0, "kept"
        if rank is None or self.rank <= rank:  # a Tucker core: fold it into down
            _, v = self.factors()
            down = v.reshape(self.rank, *self.shape[1:]).to(self.down.dtype)
            return dataclasses.replace(self, down=down, mid=None, alpha=self.scale * self.rank, rslora=False), 1.0, 0.0, \
                "kept"
        u, v = self.factors()
        left, s, right = lowrank_svd_parts([u], [v])
        new, energy, error, method = svd_to_lora(self, left, s, right, rank)
        if self.dora:
            new = dataclasses.replace(new, magnitude=self.magnitude, magnitude_axis=self.magnitude_axis)
        return new, energy, error, method

    @classmethod
    def from_factors(cls, u: torch.Tensor, s: torch.Tensor | None, v: torch.Tensor, *, like: Layer | None = None,
                     rank: int | None = None, shape: tuple[int, ...] | None = None, module_type: str | None = None,
                     fan_in_fan_out: bool | None = None, dtype: torch.dtype | None = None,
                     alpha: float | None = None, rslora: bool = False, bias: torch.Tensor | None = None) -> LoRA:
        """The LoRA ``up @ down`` of SVD factors ``u diag(s) v``, shaped for a module (conv reshape included).

        ``up = u[:, :r] sqrt(s[:r])`` and ``down = sqrt(s[:r]) v[:r]`` (``s=None``: ``up = u``, ``down = v`` as
        given). The factors carry scale 1 (``alpha = r``); with ``alpha`` given they are divided by
        ``sqrt(scale)`` each, so ``scale * up @ down`` is still ``u diag(s) v``.

        Args:
            u: ``(out, R)`` left factor (math orientation). s: ``(R,)`` singular values or ``None``.
            v: ``(R, in * prod(kernel))`` right factor.
            like: the layer the LoRA replaces: its shape, module type, orientation and dtype are the defaults.
            rank: keep the top ``rank`` triplets (default all).
            shape / module_type / fan_in_fan_out / dtype: the module weight shape, ``"linear"``/``"conv"``/
                ``"embedding"`` (other module types become conv or linear), orientation and storage dtype.
            alpha / rslora: the LoRA alpha and rsLoRA scaling (default ``alpha = r``, scale 1).
            bias: the LoRA bias as stored (``lora_B.bias``), or ``None``.

        Returns:
            The LoRA layer.
        """
        shape = tuple(like.shape if shape is None else shape)
        fan = bool(like.fan_in_fan_out if fan_in_fan_out is None and like is not None else fan_in_fan_out)
        mtype = module_type or (like.module_type if like is not None else conv_or_linear(shape))
        if mtype not in MODULE_TYPES:
            mtype = conv_or_linear(shape)
        dtype = dtype or (layer_dtype(like) if like is not None else torch.float32)
        r = u.shape[1] if rank is None else rank
        if s is None:
            up, down = u[:, :r], v[:r]
        else:
            root = s[:r].sqrt()
            up, down = u[:, :r] * root, root[:, None] * v[:r]
        if alpha is None:
            alpha = float(r)
        else:
            root_scale = lora_scale(alpha, r, rslora) ** 0.5
            up, down = up / root_scale, down / root_scale
        ms = math_shape(shape, fan)
        if len(ms) > 2:
            up = up.reshape(ms[0], r, *([1] * (len(ms) - 2)))
        down = down.reshape(r, *ms[1:])
        return cls(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=alpha, shape=shape,
                   module_type=mtype, fan_in_fan_out=fan, rslora=rslora, bias=bias)


def svd_to_lora(layer: Layer, left: torch.Tensor, s: torch.Tensor, right: torch.Tensor,
                rank: int | None) -> tuple[LoRA, float, float, str]:
    """The ``to_lora`` result from an exact SVD ``left diag(s) right`` of ``layer``'s flattened delta.

    ``rank=None`` keeps the numerical rank (``"exact-svd"``), otherwise the top ``rank`` (``"svd"``); the
    retained energy and relative error are those of the singular values; the layer's bias change becomes the
    LoRA bias (at the new scale 1).
    """
    total = float((s.double() ** 2).sum())
    if rank is None:
        r, method = numerical_rank(s, (left.shape[0], right.shape[1])), "exact-svd"
    else:
        r, method = max(1, min(rank, s.numel())), "svd"
    kept = float((s[:r].double() ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    error = max(0.0, 1.0 - energy) ** 0.5 if total > 0 else 0.0
    db = layer.delta_bias()
    bias = None if db is None else db.to(layer_dtype(layer))
    return LoRA.from_factors(left, s, right, like=layer, rank=r, bias=bias), energy, error, method


def dense_to_lora(layer: Layer, rank: int | None) -> tuple[LoRA, float, float, str]:
    """``to_lora`` of a dense kind: a truncated SVD of its flattened delta (see :func:`svd_to_lora`)."""
    left, s, right = torch.linalg.svd(layer.delta_matrix(), full_matrices=False)
    return svd_to_lora(layer, left, s, right, rank)


def factored_to_lora(layer: Layer, rank: int | None) -> tuple[LoRA, float, float, str]:
    """``to_lora`` of an additive kind: an exact SVD of its factors ``U V`` (float64 QRs + the small core's SVD,
    so the LoRA is exact at the factors' rank) where it has them, else of its dense delta (:func:`dense_to_lora`)."""
    f = layer.factors(torch.float64)
    if f is None or f[0].shape[1] == 0:
        return dense_to_lora(layer, rank)
    left, s, right = lowrank_svd_parts([f[0]], [f[1]])
    return svd_to_lora(layer, left.float(), s.float(), right.float(), rank)
