"""Pieces every adapter kind shares: tensor bookkeeping, orientation and apply-by-delta.

Conventions used by all kinds:

* ``shape`` is the shape of the adapted module's ``weight`` as torch stores it (``nn.Linear``:
  ``(out, in)``; ``nn.ConvNd``: ``(out, in/groups, *kernel)``; ``nn.Embedding``: ``(num, dim)``;
  transformers ``Conv1D``: ``(in, out)``).
* The *math orientation* is ``(out_features, in_features, *kernel)``: the matrix that multiplies the
  input. It differs from ``shape`` only when ``fan_in_fan_out`` is true (``Conv1D`` and embeddings,
  exactly as PEFT's ``transpose(..., fan_in_fan_out)``).
* ``delta()`` returns float32 in the module orientation, the value PEFT's ``get_delta_weight`` returns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ...errors import FormatError, ShapeMismatchError, UnsupportedError

MODULE_TYPES = ("linear", "conv", "embedding")


def tensor_fields(layer: Layer) -> dict[str, torch.Tensor]:
    """Return the named tensors of a layer dataclass (fields holding a tensor, ``None`` skipped)."""
    out = {}
    for name in _field_names(type(layer)):
        value = getattr(layer, name)
        if isinstance(value, torch.Tensor):
            out[name] = value
    return out


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A layer class's dataclass field names (``dataclasses.fields`` rebuilds its tuple on every call)."""
    return tuple(f.name for f in dataclasses.fields(cls))


#: the factor tensors of the kinds, by the part names the format readers use, all at least 2-D
FACTOR_PARTS = frozenset({"down", "up", "mid", "a", "b", "emb_a", "emb_b", "w1", "w1a", "w1b", "w2", "w2a", "w2b",
                          "t1", "t2"})
#: parts that are flags or scalars rather than adapter values (kohya/diffusers ``alpha``, LyCORIS IA3 ``on_input``)
SCALAR_PARTS = frozenset({"alpha", "on_input"})
#: the (down/A, up/B) part pairs of one LoRA layer, as PEFT, kohya and diffusers readers name them
LORA_PAIRS = (("down", "up"), ("a", "b"), ("emb_a", "emb_b"))


def check_factors(parts: dict[str, torch.Tensor], names: dict[str, str] | None = None,
                  index_parts: frozenset[str] = frozenset()) -> None:
    """Refuse tensors no adapter layer can be built from, before any shape or scale is derived from them.

    Every format reader (and state-dict injection) calls this on one module's tensors. It refuses:

    * a tensor that is not floating point (integer, bool, complex): adapter values are floats, and an
      integer factor would be fused as if it were one;
    * a tensor with no entries (a rank-0 factor: its scale ``alpha / r`` divides by zero);
    * a factor with fewer than 2 dimensions;
    * LoRA factors whose numbers of dimensions differ, or an up/B factor that is not ``(out, r)`` /
      ``(out, r, 1, ...)``.

    Args:
        parts: one module's tensors by part name (``down``, ``up``, ``w1a``, ``ia3``, ...); the scalar parts of
            :data:`SCALAR_PARTS` are not checked.
        names: part name -> the tensor's name in the file, for the message.
        index_parts: the parts the kind declares as integer positions (its ``index_parts``: SHiRA's
            ``indices``, VB-LoRA's top-k indices); they must be integer tensors instead of floating point.

    Raises:
        FormatError: a tensor that is not floating point (an index part that is not an integer), or an empty
            one; the message names it.
        ShapeMismatchError: a factor of the wrong number of dimensions; the message names it and its shape.
    """
    def name(part: str) -> str:
        return (names or {}).get(part, part)

    for part, t in sorted(parts.items()):  # a fixed order (A before B, down before up): the same error every time
        if part in SCALAR_PARTS:
            continue
        if part in index_parts:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise FormatError(
                    f"tensor '{name(part)}' has dtype {str(t.dtype).replace('torch.', '')}, but it holds positions and "
                    "must be an integer tensor; the checkpoint is damaged: re-save it with integer indices"
                )
            continue
        if not t.is_floating_point():
            raise FormatError(
                f"tensor '{name(part)}' has dtype {str(t.dtype).replace('torch.', '')}, but adapter tensors are floating "
                "point; the checkpoint is damaged or not an adapter: re-save it with float32/float16/bfloat16 weights"
            )
        if part in FACTOR_PARTS and t.ndim < 2:
            raise ShapeMismatchError(
                f"tensor '{name(part)}' has shape {tuple(t.shape)}, but an adapter factor has at least 2 dimensions; "
                "the checkpoint is damaged or not an adapter"
            )
        if t.numel() == 0:
            raise FormatError(
                f"tensor '{name(part)}' has shape {tuple(t.shape)} and no entries (a rank-0 layer?); an adapter tensor "
                "cannot be empty: drop this layer from the checkpoint or re-save it with a positive rank"
            )
    for down, up in LORA_PAIRS:
        if down in parts and up in parts:
            d, u = parts[down], parts[up]
            if d.ndim != u.ndim:
                raise ShapeMismatchError(
                    f"tensors '{name(down)}' {tuple(d.shape)} and '{name(up)}' {tuple(u.shape)} have {d.ndim} and "
                    f"{u.ndim} dimensions, but the two factors of a LoRA layer have the same number (2 for a linear or "
                    "embedding layer, 3 to 5 for a convolution); the checkpoint is damaged"
                )
            if any(s != 1 for s in u.shape[2:]):
                raise ShapeMismatchError(
                    f"tensor '{name(up)}' has shape {tuple(u.shape)}, but a LoRA up/B factor is (out, r), or "
                    "(out, r, 1, ...) for a convolution; the checkpoint is damaged"
                )


def layer_dtype(layer: Layer) -> torch.dtype:
    """The dtype of a layer's largest floating tensor (the dtype its file stores it in; index tensors do not count)."""
    tensors = {k: t for k, t in tensor_fields(layer).items() if t.is_floating_point()} or tensor_fields(layer)
    biggest = max(tensors.values(), key=lambda t: t.numel())
    return biggest.dtype


def layer_numel(layer: Layer) -> int:
    """Number of stored elements of a layer."""
    return sum(t.numel() for t in tensor_fields(layer).values())


def layer_nbytes(layer: Layer) -> int:
    """Number of stored bytes of a layer."""
    return sum(t.numel() * t.element_size() for t in tensor_fields(layer).values())


#: the scalar fields a layer's effect is multiplied by (``None`` for kinds without them, IA3 and Full)
SCALAR_FIELDS = ("alpha", "scale")


#: the dtype a tensor is summed in by :func:`tensor_is_finite` (wide enough that finite half values cannot overflow;
#: float32 sums in float32, 4x faster than in float64: an overflow of finite values only costs the elementwise test)
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float32}


def tensor_is_finite(t: torch.Tensor) -> bool:
    """True when a tensor holds no NaN or Inf (integer tensors always are).

    One reduction decides the common, finite case (a NaN or an Inf makes the sum non-finite; half and bfloat16 are
    summed in a wider dtype that their finite values cannot overflow); only a non-finite sum falls back to the
    elementwise test, so a float32 sum that overflows from finite values is still answered exactly. 2.5x faster than ``isfinite(t).all()`` on fp16 and no boolean copy of the tensor.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    wide = _SUM_DTYPE.get(t.dtype)
    if wide is not None and math.isfinite(float(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_fields(layer: Layer) -> list[str]:
    """The fields of a layer that hold NaN or Inf: floating tensors, and the scalars ``alpha`` and ``scale``.

    This is adaptkit's one finiteness rule: every check (``Adapter.is_finite``, status tables, inject, fuse,
    merge, convert, reparametrisation, LoftQ) goes through it, so a NaN ``lora_alpha`` in
    ``adapter_config.json`` or an Inf kohya ``alpha`` tensor counts exactly as a NaN factor does.
    """
    bad = [name for name, t in tensor_fields(layer).items() if not tensor_is_finite(t)]
    for name in SCALAR_FIELDS:
        value = getattr(layer, name, None)
        if value is not None and not math.isfinite(float(value)):
            bad.append(name)
    return bad


def layer_is_finite(layer: Layer) -> bool:
    """True when no tensor of the layer holds NaN or Inf and its alpha and scale are finite numbers."""
    return not nonfinite_fields(layer)


def check_floating(layer: Layer, index_parts: frozenset[str] = frozenset()) -> None:
    """Refuse a layer built from tensors that are not floating point (a backstop for layers built in code).

    Args:
        layer: the layer just built.
        index_parts: the fields the kind declares as integer positions (its ``index_parts``); they must be
            integer tensors instead.

    Raises:
        FormatError: naming the field and its dtype.
    """
    for name, t in tensor_fields(layer).items():
        if name in index_parts:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise FormatError(f"{layer.kind} tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}, but it "
                                  "holds positions; convert it with .long() first")
            continue
        if not t.is_floating_point():
            raise FormatError(f"{layer.kind} tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}, but adapter "
                              "tensors are floating point; convert it with .float() first")


def cast_layer(layer: Layer, dtype: torch.dtype) -> Layer:
    """Return a copy of the layer with every floating tensor cast to ``dtype``."""
    changes = {k: v.to(dtype) for k, v in tensor_fields(layer).items() if v.is_floating_point()}
    return dataclasses.replace(layer, **changes)


#: why a layer without a weight shape cannot compute (PEFT VeRA, RandLoRA, MiSS and FourierFT files store none)
NO_SHAPE = ("this layer was read from a file that does not store its module's weight shape (PEFT VeRA, RandLoRA, "
            "MiSS, FourierFT, OFT, WaveFT, SHiRA ...); pass the base model (--base BASE on the command line, base= in Python) so the shape is "
            "known, or fuse it into its base")


def math_shape(shape: tuple[int, ...] | None, fan_in_fan_out: bool) -> tuple[int, ...]:
    """The math orientation ``(out, in, *k)`` of a module weight shape.

    Raises:
        UnsupportedError: ``shape`` is ``None`` (a layer read without its weight shape, :data:`NO_SHAPE`).
    """
    if shape is None:
        raise UnsupportedError(NO_SHAPE)
    if fan_in_fan_out:
        if len(shape) != 2:
            raise ValueError("fan_in_fan_out applies to 2-D weights only")
        return (shape[1], shape[0])
    return tuple(shape)


def to_module(delta_math: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """Turn a math-oriented tensor into the module orientation."""
    return delta_math.T if fan_in_fan_out else delta_math


def f32(t: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 (no copy when it already is)."""
    return t.to(torch.float32)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank



def _shape_text(shape: Any) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def layer_repr(layer: Layer) -> str:
    """A layer in one line: kind, weight shape, rank, alpha and scale, dtype, other settings, tensor shapes.

    ``LoRA(shape=(64, 96), rank=8, alpha=8, scale=1, dtype=float32; down (8, 96), up (64, 8))``. Fields at
    their default are left out; tensors show their shape, never their values (what a notebook displays).
    """
    parts = [f"shape={_shape_text(layer.shape) if layer.shape is not None else None}"]
    if layer.rank is not None:
        parts.append(f"rank={layer.rank}")
    if layer.alpha is not None:
        parts.append(f"alpha={float(layer.alpha):g}")
        parts.append(f"scale={float(layer.scale):g}")
    tensors = tensor_fields(layer)
    if tensors:
        parts.append(f"dtype={str(layer_dtype(layer)).removeprefix('torch.')}")
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if f.name in ("shape", "rank", "alpha") or value is None or isinstance(value, torch.Tensor):
            continue
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        parts.append(f"{f.name}={value!r}")
    shapes = ", ".join(f"{name} {_shape_text(t.shape)}" for name, t in tensors.items())
    return f"{type(layer).__name__}({', '.join(parts)}; {shapes or 'no tensors'})"


class LayerRepr:
    """Gives a kind the concise :func:`layer_repr` (its dataclass is declared with ``repr=False``)."""

    def __repr__(self) -> str:
        return layer_repr(self)


@runtime_checkable
class Layer(Protocol):
    """The contract every adapter kind implements (the builtin kinds, and any added with ``register_kind``).

    A kind is a frozen dataclass of tensors plus scalar settings. Operations (fuse, merge, convert, status,
    analysis, inject) use only these members, never the kind's name or class, so a new kind works everywhere
    once it implements them. :class:`~adaptkit.core.kinds.common.KindBase` and
    :class:`~adaptkit.core.kinds.common.DeltaMixin` give most of them from ``delta_math()`` and ``factors()``.

    Attributes:
        kind: the kind's name in :data:`~adaptkit.core.kinds.KINDS`.
        shape: the adapted module's weight shape (module orientation), or ``None`` when the tensors leave it open.
        rank / alpha: the nominal rank and alpha (``None`` for kinds without them); ``scale`` multiplies the update.
        fan_in_fan_out: the module stores the transpose of the math orientation (``Conv1D``, embeddings).
        module_type: ``"linear"``, ``"conv"``, ``"embedding"`` or ``"norm"``.
        additive: ``apply(W)`` is ``W + delta()`` (so the layer can be summed, subtracted, unfused).
        has_delta: a base-free ``delta()`` exists (False for multiplicative kinds such as IA3).
        changes_bias: ``apply`` changes the module bias.
        rowwise: ``apply_rows`` is available (each output row depends only on the same rows of ``W``).
        dora: the layer re-normalises the weight by a magnitude vector (DoRA / LyCORIS ``dora_scale``).
        index_parts: the tensor fields holding integer positions (exempt from the floating-point checks, kept by
            ``cast``); empty for most kinds.
    """

    kind: ClassVar[str]
    index_parts: ClassVar[frozenset[str]]
    shape: tuple[int, ...] | None
    fan_in_fan_out: bool
    module_type: str

    @property
    def rank(self) -> int | None: ...
    @property
    def alpha(self) -> float | None: ...
    @property
    def scale(self) -> float: ...
    @property
    def additive(self) -> bool: ...
    @property
    def has_delta(self) -> bool: ...
    @property
    def changes_bias(self) -> bool: ...
    @property
    def rowwise(self) -> bool: ...
    @property
    def dora(self) -> bool: ...

    def delta(self) -> torch.Tensor:
        """Float32 weight change in the module orientation (raises ``UnsupportedError`` without ``has_delta``)."""
    def delta_matrix(self) -> torch.Tensor:
        """Float32 weight change in the math orientation flattened to ``(out, in * prod(kernel))``."""
    def delta_bias(self) -> torch.Tensor | None:
        """Float32 change of the module bias, or ``None``."""
    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapted ``(weight, bias)`` in float32."""
    def apply_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias half of :meth:`apply` (raises ``UnsupportedError`` when it changes a bias that is ``None``)."""
    def unapply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of :meth:`apply` (additive kinds only; others raise)."""
    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """``rows`` (float32 rows ``r0:r1`` of the module weight) after ``W + weight * (apply(W) - W)``; may work in place.

        ``cache`` is a dict the caller keeps for one tensor, where the layer may keep prepared factors between
        row blocks. Only for ``rowwise`` layers.
        """
    def io_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """``(input multiplier, output multiplier)`` for kinds that scale features instead of changing ``W`` (IA3)."""
    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """The layer made to fit a module weight of ``shape``; ``module`` is the live module's kind
        (``"linear"``, ``"conv"``, ``"conv1d"``, ``"embedding"``) or ``None`` when only the shape is known."""
    def fro_norm(self) -> float:
        """``||delta||_F`` (NaN without ``has_delta``); low-rank kinds use ``r x r`` Gram matrices."""
    def inner(self, other: Layer) -> float:
        """``<delta, other.delta>_F`` (NaN when either has no delta or the shapes differ)."""
    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, V)`` with ``U @ V == delta_matrix()`` where the kind is low rank, else ``None``."""
    def experts(self) -> dict[int, Layer] | None:
        """For a layer on a stacked experts parameter: expert index -> that expert's layer (a plain LoRA), else ``None``."""
    @classmethod
    def operations(cls) -> dict[str, str]:
        """How fuse, unfuse, merge and convert-to-LoRA treat the kind (the capability table): ``"exact"``, ... ."""
    @classmethod
    def declared_module_type(cls) -> str | None:
        """The ``module_type`` the kind declares for all its layers, or ``None`` when it is decided per layer."""
    def with_experts(self, experts: Sequence[Layer]) -> Layer:
        """A layer like this one on stacked experts whose expert ``e`` is ``experts[e]`` (LoRA layers, as merging one
        expert at a time gives); raises :class:`~adaptkit.errors.UnsupportedError` for a layer without experts."""
    def lora_ab(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored, unscaled LoRA ``(B (out, r), A (r, in * k))`` (PEFT's factor-wise merges), else ``None``."""
    def spectrum(self) -> tuple[torch.Tensor, str]:
        """Singular values of ``delta_matrix()`` (float64, descending) and how they were computed."""
    def sparsity(self) -> float:
        """Fraction of the entries of ``delta_matrix()`` that are exactly zero."""
    def update_vector(self) -> torch.Tensor | None:
        """For kinds without a delta: the vector their update is compared by (IA3: ``l - 1``), else ``None``."""
    def note(self) -> str:
        """A one-line description for analysis tables of what the statistics describe (may be empty)."""
    def keeps_as_lora(self, rank: int | None) -> bool:
        """True when :meth:`to_lora` would keep the layer as it is (a plain LoRA of rank at most ``rank``)."""
    def lora_obstacle(self) -> str | None:
        """Why the layer has no LoRA form without the base weights, or ``None``."""
    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """``(lora, retained_energy, relative_error, method)``: the layer as a LoRA of ``rank`` (``None``: exact)."""
    def parts(self) -> dict[str, torch.Tensor]:
        """The layer's tensors by name (``None`` fields left out)."""
    def settings(self) -> dict[str, Any]:
        """The layer's scalar settings (every non-tensor field but ``shape``)."""
    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], *, shape: tuple[int, ...] | None,
                   settings: dict[str, Any]) -> Layer:
        """Rebuild a layer from :meth:`parts`, its shape and :meth:`settings`."""
    @classmethod
    def weighted_sum(cls, layers: list[Layer], weights: list[float]) -> Layer:
        """A merge in the kind's own parameters (IA3's weighted vector sum); kinds with a delta raise."""
    def cast(self, dtype: torch.dtype) -> Layer:
        """A copy with every floating tensor cast to ``dtype``."""
    def nonfinite_fields(self) -> list[str]:
        """Fields holding NaN or Inf (tensors, ``alpha``, ``scale``)."""
