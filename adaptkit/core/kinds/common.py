"""The shared implementation of the :class:`~adaptkit.core.kinds.base.Layer` protocol.

:class:`KindBase` gives every kind the generic members (parts/settings and back, cast, finiteness, repr, the
norms and spectra from ``factors()`` or the dense delta, and "no" answers for the optional capabilities).
:class:`DeltaMixin` adds what a kind with a base-free delta derives from ``delta_math()``: ``delta``,
``apply``/``unapply`` (with DoRA when the kind has a magnitude) and ``fit``. A kind overrides what it can do
better (LoRA: low-rank rows and an exact SVD; LoKr: Kronecker spectra; IA3: everything multiplicative).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ...errors import ShapeMismatchError, UnsupportedError
from ..linalg import gram_inner, lowrank_singular_values
from .base import (
    NO_SHAPE,
    Layer,
    LayerRepr,
    cast_layer,
    nonfinite_fields,
    tensor_fields,
)
from .dora import dora_apply


def conv_or_linear(shape: tuple[int, ...]) -> str:
    """``"conv"`` for a weight with a kernel, else ``"linear"``."""
    return "conv" if len(shape) > 2 else "linear"


def add_delta_rows(layer: Layer, rows: torch.Tensor, r0: int, r1: int, weight: float,
                   cache: dict | None) -> torch.Tensor:
    """Add ``weight * delta`` to rows ``r0:r1`` of the module weight in place, from the layer's factors ``U V``
    where it has them (no ``m x n`` delta is built) or from its dense delta, prepared once per tensor in ``cache``.

    Args:
        layer: an additive layer (its ``factors()`` and ``delta_matrix()`` are used).
        rows: float32 rows ``r0:r1`` of the module weight (module orientation).
        r0 / r1: the rows' range. weight: the multiplier of the delta.
        cache: a dict kept by the caller for one tensor, or ``None``.

    Returns:
        ``rows``, changed in place.
    """
    if cache is not None and "factors" in cache:
        prepared = cache["factors"]
    else:
        prepared = layer.factors() or (layer.delta_matrix(),)  # computed once per tensor when a cache is kept
        if cache is not None:
            cache["factors"] = prepared
    if len(prepared) == 1:  # the dense math-oriented delta (out, in * k)
        d = prepared[0]
        if layer.fan_in_fan_out:
            return rows.add_(d.T[r0:r1], alpha=weight)
        rows.view(r1 - r0, -1).add_(d[r0:r1], alpha=weight)
        return rows
    u, v = prepared
    if layer.fan_in_fan_out:
        rows.addmm_(v.T[r0:r1], u.T, alpha=weight)
    else:
        rows.view(r1 - r0, -1).addmm_(u[r0:r1], v, alpha=weight)
    return rows


class KindBase(LayerRepr):
    """Generic protocol members for a frozen dataclass kind (its dataclass is declared with ``repr=False``)."""

    kind: ClassVar[str]
    #: capability defaults; kinds override them as class attributes or properties
    has_delta: ClassVar[bool] = True
    rowwise: ClassVar[bool] = False
    #: the tensor fields that hold integer positions (SHiRA's ``indices``, VB-LoRA's top-k indices): exempt from
    #: the floating-point checks and from ``cast``
    index_parts: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def declared_module_type(cls) -> str | None:
        """The ``module_type`` a class attribute or a dataclass field default declares for every layer of the kind
        (``"experts"``, ``"norm"``), or ``None`` when a property decides it per layer or there is no default."""
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.name == "module_type":
                    return None if f.default is dataclasses.MISSING else f.default
        for c in cls.__mro__:
            if "module_type" in vars(c):
                value = vars(c)["module_type"]
                return value if isinstance(value, str) else None
        return None

    @classmethod
    def operations(cls) -> dict[str, str]:
        """How fuse, unfuse, merge and convert-to-LoRA treat layers of this kind (the capability table of
        ``docs/formats.md``): ``"exact"``, ``"lossy (report)"``, ``"needs base"`` or ``"refused: <reason>"``.

        The defaults are an additive kind's: ``W + dW`` fused and subtracted exactly, merged through ``dW``
        (exact for ``cat``/``task_arithmetic``, lossy with a report where an SVD compresses), and a LoRA exactly at
        full rank (lossy with a report below it). A kind with a DoRA ``magnitude`` field notes that its DoRA layers
        are refused by unfuse and merge. Kinds that are not additive override it.
        """
        dora = dataclasses.is_dataclass(cls) and any(f.name == "magnitude" for f in dataclasses.fields(cls))
        note = "; DoRA layers refused" if dora else ""
        return {"fuse": "exact", "unfuse": f"exact{note}", "merge": f"exact{note}",
                "lora": "exact at full rank, lossy (report) below" + ("; some DoRA layers: needs base" if dora else "")}

    @property
    def dora(self) -> bool:
        """True when the layer has a DoRA magnitude (a ``magnitude`` field that is set)."""
        return getattr(self, "magnitude", None) is not None

    # ------------------------------------------------------------------ parts

    def parts(self) -> dict[str, torch.Tensor]:
        """The layer's tensors by field name (``None`` fields left out)."""
        return tensor_fields(self)

    def settings(self) -> dict[str, Any]:
        """Every non-tensor field but ``shape`` (alpha, rank, module type, orientation, flags)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "shape" and not isinstance(getattr(self, f.name), torch.Tensor)
                and not (getattr(self, f.name) is None and "Tensor" in str(f.type))}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], *, shape: tuple[int, ...] | None,
                   settings: dict[str, Any]) -> Layer:
        """Rebuild a layer from :meth:`parts`, its shape and :meth:`settings` (the checks of the kind run)."""
        return cls(**parts, shape=None if shape is None else tuple(shape), **settings)

    def cast(self, dtype: torch.dtype) -> Layer:
        """A copy with every floating tensor cast to ``dtype``."""
        return cast_layer(self, dtype)

    def nonfinite_fields(self) -> list[str]:
        """Fields holding NaN or Inf (see :func:`adaptkit.core.kinds.base.nonfinite_fields`)."""
        return nonfinite_fields(self)

    # ------------------------------------------------------------------ capabilities with a "no" default

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """No low-rank factorisation (overridden by low-rank kinds)."""
        return None

    def lora_ab(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Not stored as LoRA factors."""
        return None

    def experts(self) -> dict[int, Layer] | None:
        """Not a layer on stacked experts."""
        return None

    def with_experts(self, experts: Sequence[Layer]) -> Layer:
        """Not a layer on stacked experts: always raises :class:`UnsupportedError`."""
        raise UnsupportedError(f"a {self.kind} layer is not on stacked experts, so it has no experts to replace")

    def io_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """The layer changes the weight, not the features."""
        return None

    def update_vector(self) -> torch.Tensor | None:
        """Compared by its delta, not by a vector."""
        return None

    def keeps_as_lora(self, rank: int | None) -> bool:
        """Not a LoRA already."""
        return False

    @classmethod
    def weighted_sum(cls, layers: list[Layer], weights: list[float]) -> Layer:
        """Kinds with a delta merge through it (as LoRA); there is no merge in their own parameters."""
        raise UnsupportedError(f"{cls.kind} layers merge through their delta, not in their own parameters")

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Not row-wise (``rowwise`` is False): raises."""
        raise UnsupportedError(f"a {self.kind} layer is not applied row by row; use apply()")

    # ------------------------------------------------------------------ norms and spectra

    def fro_norm(self) -> float:
        """``||delta||_F`` in float64: Gram matrices of the factors where low rank, else dense; NaN without a delta."""
        if not self.has_delta:
            return math.nan
        f = self.factors(torch.float64)
        if f is not None:
            return math.sqrt(max(gram_inner(f, f), 0.0))
        return float(torch.linalg.vector_norm(self.delta_matrix().double()))

    def inner(self, other: Layer) -> float:
        """``<delta, other.delta>_F`` in float64 (``r x r`` Grams when both are low rank); NaN when not comparable."""
        if not (self.has_delta and other.has_delta):
            return math.nan
        fa, fb = self.factors(torch.float64), other.factors(torch.float64)
        if fa is not None and fb is not None:
            if fa[0].shape[0] != fb[0].shape[0] or fa[1].shape[1] != fb[1].shape[1]:
                return math.nan
            return gram_inner(fa, fb)
        da, db = self.delta_matrix().double(), other.delta_matrix().double()
        if da.shape != db.shape:
            return math.nan
        return float((da * db).sum())

    def spectrum(self) -> tuple[torch.Tensor, str]:
        """Singular values of the flattened delta (float64, descending): from the factors or dense.

        Raises:
            UnsupportedError: the layer has no base-free delta (``has_delta`` is False).
        """
        if not self.has_delta:
            raise UnsupportedError(f"a {self.kind} layer has no base-free delta to take singular values of")
        f = self.factors(torch.float64)
        if f is not None:
            return lowrank_singular_values(*f), "lowrank"
        return torch.linalg.svdvals(self.delta_matrix()).double(), "dense"

    def sparsity(self) -> float:
        """Fraction of exactly-zero entries of the flattened delta (structural zeros of the factors where low rank).

        An entry of ``U V`` is zero when its row of ``U`` or its column of ``V`` is all zero; this equals the
        dense count unless nonzero terms cancel exactly (which trained weights never do).
        """
        if not self.has_delta:
            return math.nan
        f = self.factors(torch.float64)
        if f is not None:
            u, v = f
            live_rows = int((u != 0).any(dim=1).sum())
            live_cols = int((v != 0).any(dim=0).sum())
            return 1.0 - (live_rows / u.shape[0]) * (live_cols / v.shape[1])
        d = self.delta_matrix()
        return float((d == 0).sum()) / d.numel()

    def note(self) -> str:
        """What the analysis statistics describe, when that needs saying."""
        if self.dora:
            return "DoRA: statistics of the directional update; the magnitude acts on the base weight"
        return ""


class DeltaMixin(KindBase):
    """The protocol for kinds with a base-free delta (LoRA, LoHa, LoKr, Full), from ``delta_math()``.

    Without a DoRA magnitude the kind is additive: ``W + delta``; with one, ``apply`` re-normalises.
    """

    #: the kind's factors rebuild a flat delta, so the module's (conv) shape can be taken over (LoHa, LoKr)
    reshapes_to_module: ClassVar[bool] = False
    #: the layer may adapt an embedding whatever its module type (a dense difference)
    any_module: ClassVar[bool] = False

    @property
    def has_delta(self) -> bool:  # type: ignore[override]
        """True once the weight shape is known (a PEFT WaveFT/SHiRA/MiSS file leaves it to the base)."""
        return self.shape is not None

    def delta_math(self) -> torch.Tensor:
        """Float32 delta in the math orientation ``(out, in, *k)`` (each kind implements it)."""
        raise NotImplementedError

    @property
    def additive(self) -> bool:
        """False when a DoRA magnitude is present (the effect then depends on the base weight)."""
        return not self.dora

    def _check_shaped(self) -> None:
        """Refuse the delta of a layer whose file left the weight shape open (a PEFT WaveFT/SHiRA file)."""
        if self.shape is None:
            raise UnsupportedError(NO_SHAPE)

    def delta(self) -> torch.Tensor:
        """Float32 delta in the module orientation (PEFT's ``get_delta_weight``)."""
        self._check_shaped()
        d = self.delta_math()
        return d.T if self.fan_in_fan_out else d

    def delta_matrix(self) -> torch.Tensor:
        """Float32 delta in the math orientation, flattened to ``(out, in * prod(kernel))``."""
        self._check_shaped()
        d = self.delta_math()
        return d.reshape(d.shape[0], -1)

    def delta_bias(self) -> torch.Tensor | None:
        """Change of the module bias, float32, or ``None``."""
        return None

    @property
    def changes_bias(self) -> bool:
        """True when the layer changes the module's bias (PEFT ``lora_B.bias``, LyCORIS ``diff_b``)."""
        return self.delta_bias() is not None

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the fused ``(weight, bias)`` in float32 for a module weight of ``self.shape``."""
        dm = self.delta_math()
        w = weight.to(torch.float32)
        w_math = (w.T if self.fan_in_fan_out else w).reshape(dm.shape)
        if self.dora:
            fused = dora_apply(w_math, dm, self.magnitude, self.magnitude_axis)
        else:
            fused = w_math + dm
        fused = (fused.T if self.fan_in_fan_out else fused).reshape(weight.shape)
        return fused, self.apply_bias(bias)

    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The module bias after :meth:`apply`: ``b + delta_bias()`` in float32.

        Raises:
            UnsupportedError: the layer changes the bias and the module has none (``bias`` is ``None``).
        """
        db = self.delta_bias()
        if bias is None:
            if db is not None:
                raise UnsupportedError("this adapter layer changes the bias but the base module has none")
            return None
        new_b = bias.to(torch.float32)
        return new_b if db is None else new_b + db.reshape(new_b.shape)

    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`apply` for additive layers: subtract the delta again."""
        if not self.additive:
            raise ValueError("DoRA cannot be unfused without the original base weight")
        new_w = weight.to(torch.float32) - self.delta().reshape(weight.shape)
        new_b = None if bias is None else bias.to(torch.float32)
        db = self.delta_bias()
        if db is not None and new_b is not None:
            new_b = new_b - db.reshape(new_b.shape)
        return new_w, new_b

    # ------------------------------------------------------------------ fitting to a module

    def _transposed(self, shape: tuple[int, ...]) -> Layer:
        """The layer for the transposed module weight ``shape`` (a ``Conv1D``)."""
        return dataclasses.replace(self, shape=shape, fan_in_fan_out=True)

    def _refined(self, shape: tuple[int, ...]) -> Layer:
        """The layer for a base weight ``shape`` its tensors leave open (a reader's lenient fit)."""
        if self.shape is None:  # a file that stores no shape (a registered kind read from a state dict)
            return dataclasses.replace(self, shape=shape)
        if self.reshapes_to_module and tuple(self.shape) != shape and math.prod(self.shape) == math.prod(shape):
            return dataclasses.replace(self, shape=shape, module_type=conv_or_linear(shape))
        return self

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """The layer made to fit a module weight of ``shape``.

        With ``module=None`` (a reader that knows only the base's weight shapes) the shape is taken where the
        tensors leave it open (a flattened LoHa/LoKr conv, a 1x1 conv LoRA stored as linear) and the layer is
        returned unchanged otherwise. With the live module's kind (``"linear"``, ``"conv"``, ``"conv1d"``,
        ``"embedding"``) the fit is strict.

        Raises:
            ShapeMismatchError: (strict) the layer cannot act on this module; the message gives both shapes.
        """
        w_shape = tuple(int(s) for s in shape)
        if module is None or self.shape is None:
            return self._refined(w_shape) if w_shape else self
        own = tuple(self.shape)
        if module == "embedding":
            if self.module_type != "embedding" and not self.any_module:
                raise ShapeMismatchError(f"a {self.module_type} {self.kind} layer cannot adapt an embedding {w_shape}")
            if own != w_shape:
                raise ShapeMismatchError(f"{self.kind} layer for weight {own} does not fit embedding weight {w_shape}")
            return self
        if module == "conv1d" and not self.fan_in_fan_out and len(own) == 2 and own == w_shape[::-1] and own != w_shape:
            return self._transposed(w_shape)
        if module == "conv" and own != w_shape and self.reshapes_to_module and math.prod(own) == math.prod(w_shape) \
                and own[0] == w_shape[0]:
            return dataclasses.replace(self, shape=w_shape, module_type="conv")
        if own != w_shape:
            raise ShapeMismatchError(f"{self.kind} layer for weight {own} does not fit weight {w_shape}")
        return self

    # ------------------------------------------------------------------ conversion to LoRA

    def lora_obstacle(self) -> str | None:
        """A DoRA magnitude depends on the base weight; a file that leaves the shape open needs it; else ``None``."""
        if self.shape is None:
            return "its file does not fix the weight shape, so its LoRA form needs the base weight: pass --base (base= in Python)"
        if self.dora:
            return "its DoRA magnitude depends on the base weight (fuse it instead)"
        return None


__all__ = ["DeltaMixin", "KindBase", "add_delta_rows", "conv_or_linear"]
