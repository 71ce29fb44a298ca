"""ExpertLoRA: a LoRA on a parameter tensor with a leading experts axis (PEFT ``target_parameters``).

PEFT's ``ParamWrapper`` (``LoraConfig(target_parameters=[...])``) adapts a bare ``nn.Parameter`` rather than a
module: mixture-of-experts weights stored as one 3-D tensor, e.g. transformers' ``experts.gate_up_proj`` of shape
``(E, 2 * intermediate, hidden)``. Each expert ``e`` gets its own rank-``r`` update, all with one alpha::

    dW[e] = scale * up[e] @ down[e]        # (out, in), the math orientation of expert e

``down`` is ``(E, r, in)`` and ``up`` ``(E, out, r)``. PEFT stores them as one ``lora_A.weight`` ``(r * E, in)``
(experts major: rows ``e * r .. e * r + r``) and one ``lora_B.weight`` ``(out, r * E)`` (experts *interleaved*:
column ``k * E + e`` is rank ``k`` of expert ``e``); :func:`from_peft` / :func:`to_peft` convert.

Most transformers MoE classes store the parameter as ``(E, out, in)``; some (gpt-oss, Aria: the class attribute
``is_transposed``) as ``(E, in, out)``. ``fan_in_fan_out`` is true for those, exactly as PEFT's ``get_delta_weight``
then returns ``einsum("o r e, e r i -> e i o")``; the factors are the same either way (PEFT's files do not say
which, the model class does). A 2-D parameter is one expert: ``shape`` ``(out, in)``, ``delta = scale * B @ A``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from ..linalg import lowrank_singular_values, lowrank_svd_parts, split_factors
from .base import Layer, check_floating, layer_dtype, lora_scale
from .common import DeltaMixin
from .lora import LoRA


def from_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down (E, r, in), up (E, out, r))`` from PEFT's ``lora_A.weight`` ``(r*E, in)`` / ``lora_B.weight`` ``(out, r*E)``.

    Raises:
        ShapeMismatchError: the factors are not ``r * num_experts`` wide, or disagree with each other.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] % num_experts:
        raise ShapeMismatchError(
            f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not the factors of a LoRA on {num_experts} experts "
            f"(lora_A (r*E, in), lora_B (out, r*E) with E = {num_experts}); the config's r does not match the weights"
        )
    down = a.reshape(num_experts, -1, a.shape[1])
    up = b.reshape(b.shape[0], -1, num_experts).permute(2, 0, 1)  # PEFT: lora_B columns are (rank, expert)
    return down, up


def to_peft(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A.weight (r*E, in), lora_B.weight (out, r*E))`` of ``down (E, r, in)`` / ``up (E, out, r)``."""
    e, out, r = up.shape
    return down.reshape(e * down.shape[1], down.shape[2]).contiguous(), up.permute(1, 2, 0).reshape(out, r * e).contiguous()


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class ExpertLoRA(DeltaMixin):
    """A LoRA per expert on one parameter tensor.

    Args:
        down: ``(E, r, in)`` (PEFT's ``lora_A`` per expert).
        up: ``(E, out, r)`` (PEFT's ``lora_B`` per expert).
        alpha: the LoRA alpha (one for all experts, as PEFT has).
        shape: the parameter's shape: ``(E, out, in)``, ``(E, in, out)`` with ``fan_in_fan_out``, or ``(out, in)``
            for a 2-D parameter (``E == 1``); ``None`` takes ``(E, out, in)`` (``(E, in, out)``) from the factors.
        fan_in_fan_out: the parameter stores each expert transposed, ``(E, in, out)`` (transformers'
            ``is_transposed``: gpt-oss, Aria).
        rslora: scale is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        module_type: ``"experts"``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    shape: tuple[int, ...] | None = None
    fan_in_fan_out: bool = False
    rslora: bool = False
    module_type: str = "experts"

    kind: ClassVar[str] = "expert_lora"

    def __post_init__(self) -> None:
        check_floating(self)
        if self.down.ndim != 3 or self.up.ndim != 3:
            raise ShapeMismatchError(f"ExpertLoRA factors are 3-D, down (E, r, in) and up (E, out, r); got "
                                     f"{tuple(self.down.shape)} and {tuple(self.up.shape)}")
        e, r, n = self.down.shape
        if self.up.shape[0] != e or self.up.shape[2] != r or r == 0:
            raise ShapeMismatchError(f"ExpertLoRA factors down {tuple(self.down.shape)} / up {tuple(self.up.shape)} "
                                     "disagree on the experts or the rank (down (E, r, in), up (E, out, r), r > 0)")
        m = self.up.shape[1]
        default = (e, n, m) if self.fan_in_fan_out else (e, m, n)
        if self.shape is None:
            object.__setattr__(self, "shape", default)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.shape != default and not (e == 1 and not self.fan_in_fan_out and self.shape == (m, n)):
            raise ShapeMismatchError(f"ExpertLoRA factors down {tuple(self.down.shape)} / up {tuple(self.up.shape)} do "
                                     f"not fit a parameter of shape {self.shape} (expected {default})")

    # ------------------------------------------------------------------ scalars

    @property
    def num_experts(self) -> int:
        """The number of experts ``E``."""
        return int(self.down.shape[0])

    @property
    def rank(self) -> int:
        """The LoRA rank ``r`` of every expert."""
        return int(self.down.shape[1])

    @property
    def scale(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def rowwise(self) -> bool:
        """Expert ``e`` of the update needs only expert ``e`` of the weight: fuse streams blocks of experts."""
        return True

    def _factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U (E, out, r), V (E, r, in))`` with ``U[e] @ V[e]`` expert ``e``'s math-oriented delta (scale in ``U``)."""
        return self.up.to(dtype) * self.scale, self.down.to(dtype)

    # ------------------------------------------------------------------ delta and apply

    def delta_math(self) -> torch.Tensor:
        """Float32 ``(E, out, in)``: every expert's delta in the math orientation."""
        u, v = self._factors()
        return torch.bmm(u, v)

    def delta(self) -> torch.Tensor:
        """Float32 delta of the parameter's shape (PEFT's ``ParamWrapper.get_delta_weight``)."""
        d = self.delta_math()
        return (d.transpose(1, 2) if self.fan_in_fan_out else d).reshape(self.shape)

    def delta_matrix(self) -> torch.Tensor:
        """Float32 ``(E * out, in)``: the experts' math-oriented deltas stacked (the Frobenius norm is the layer's)."""
        d = self.delta_math()
        return d.reshape(-1, d.shape[-1])

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W + delta, bias)`` in float32 (PEFT's ``ParamWrapper`` has no bias)."""
        return weight.to(torch.float32) + self.delta().reshape(weight.shape), self.apply_bias(bias)

    def apply_rows(self, rows: torch.Tensor, r0: int, r1: int, *, weight: float = 1.0,
                   cache: dict | None = None) -> torch.Tensor:
        """Add ``weight * delta`` to experts ``r0:r1`` of the parameter in place (one batched matmul, no full delta).

        For a 2-D parameter (one expert) ``r0:r1`` are its rows, as for a LoRA.
        """
        if cache is not None and "factors" in cache:
            u, v = cache["factors"]
        else:
            u, v = self._factors()
            if cache is not None:
                cache["factors"] = (u, v)
        if len(self.shape) == 2:
            rows.view(r1 - r0, -1).addmm_(u[0, r0:r1], v[0], alpha=weight)
        elif self.fan_in_fan_out:
            rows.baddbmm_(v[r0:r1].transpose(1, 2), u[r0:r1].transpose(1, 2), alpha=weight)
        else:
            rows.baddbmm_(u[r0:r1], v[r0:r1], alpha=weight)
        return rows

    def fit(self, shape: tuple[int, ...], module: str | None = None) -> Layer:
        """The layer for a parameter of ``shape``: as it is, or with the other expert orientation when only that fits.

        A square expert (``in == out``) cannot tell the orientation from the shape; the reader's (or
        ``fan_in_fan_out``'s) is kept. ``module="experts_transposed"`` / ``"experts"`` (a live module's
        ``is_transposed``) decides it.

        Raises:
            ShapeMismatchError: neither orientation fits ``shape``.
        """
        shape = tuple(int(s) for s in shape)
        flipped = None
        if len(self.shape) == 3:
            e, a, b = self.shape
            flipped = dataclasses.replace(self, shape=(e, b, a), fan_in_fan_out=not self.fan_in_fan_out)
        if module in ("experts", "experts_transposed") and flipped is not None:
            want = module == "experts_transposed"
            layer = self if self.fan_in_fan_out == want else flipped
            if layer.shape != shape:
                raise ShapeMismatchError(f"expert_lora layer for parameter {self.shape} does not fit {shape}")
            return layer
        if self.shape == shape:
            return self
        if flipped is not None and flipped.shape == shape:
            return flipped
        raise ShapeMismatchError(f"expert_lora layer for parameter {self.shape} does not fit parameter {shape}")

    # ------------------------------------------------------------------ norms and spectra, per expert

    def experts(self) -> dict[int, LoRA]:
        """Expert ``e``'s update as a plain :class:`LoRA` on the slice ``W[e]`` (``fan_in_fan_out`` when transposed)."""
        out, n = self.up.shape[1], self.down.shape[2]
        shape = (n, out) if self.fan_in_fan_out else (out, n)
        return {e: LoRA(down=self.down[e], up=self.up[e], alpha=self.alpha, shape=shape, module_type="linear",
                        fan_in_fan_out=self.fan_in_fan_out, rslora=self.rslora) for e in range(self.num_experts)}

    def with_experts(self, experts: Sequence[Layer]) -> ExpertLoRA:
        """This parameter's layer with expert ``e`` replaced by ``experts[e]`` (one LoRA per expert, as per-expert merging
        gives them, ranks may differ).

        Each expert's scale is folded into its ``up``; experts of a lower rank are padded with zero directions to the
        largest, so the result has ``alpha = rank`` (scale 1) and PEFT's one ``r`` for the parameter.

        Raises:
            ShapeMismatchError: not one layer per expert, or an expert's LoRA does not fit the expert's slice.
        """
        if len(experts) != self.num_experts:
            raise ShapeMismatchError(f"an expert_lora layer on {self.num_experts} experts needs {self.num_experts} "
                                     f"expert layers, got {len(experts)}")
        slices = self.experts()
        ups, downs = [], []
        for e, x in enumerate(experts):
            ab = x.lora_ab()
            if ab is None or tuple(x.shape) != tuple(slices[e].shape) or x.fan_in_fan_out != self.fan_in_fan_out:
                raise ShapeMismatchError(f"expert {e}: a {x.kind} layer of shape {tuple(x.shape)} does not fit the "
                                         f"expert's LoRA slot {tuple(slices[e].shape)}")
            b, a = ab
            ups.append(b.to(torch.float32) * x.scale)
            downs.append(a.to(torch.float32).reshape(a.shape[0], -1))
        r = max(a.shape[0] for a in downs)
        dtype = layer_dtype(self)
        up = torch.stack([torch.nn.functional.pad(b, (0, r - b.shape[1])) for b in ups]).to(dtype)
        down = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for a in downs]).to(dtype)
        return dataclasses.replace(self, up=up, down=down, alpha=float(r), rslora=False)

    def fro_norm(self) -> float:
        """``||delta||_F`` in float64 from the experts' ``r x r`` Gram matrices."""
        u, v = self._factors(torch.float64)
        return math.sqrt(max(float((u.transpose(1, 2) @ u * (v @ v.transpose(1, 2))).sum()), 0.0))

    def inner(self, other: Layer) -> float:
        """``<delta_matrix, other.delta_matrix>_F``: per-expert Grams against another ExpertLoRA with the same experts
        (math orientation), else dense; NaN when the matrices differ in shape."""
        if not other.has_delta:
            return math.nan
        if isinstance(other, ExpertLoRA):
            ua, va = self._factors(torch.float64)
            ub, vb = other._factors(torch.float64)
            if ua.shape[:2] != ub.shape[:2] or va.shape[2] != vb.shape[2]:
                return math.nan
            return float((ua.transpose(1, 2) @ ub * (va @ vb.transpose(1, 2))).sum())
        da, db = self.delta_matrix().double(), other.delta_matrix().double()
        return float((da * db).sum()) if da.shape == db.shape else math.nan

    def spectrum(self) -> tuple[torch.Tensor, str]:
        """The singular values of every expert's delta together, descending (those of the block-diagonal update)."""
        u, v = self._factors(torch.float64)
        s = torch.cat([lowrank_singular_values(u[e], v[e]) for e in range(self.num_experts)])
        return torch.sort(s, descending=True).values, "lowrank"

    def sparsity(self) -> float:
        """Fraction of exactly-zero entries of the delta (structural zeros of each expert's factors)."""
        u, v = self._factors(torch.float64)
        live = (u != 0).any(dim=2).sum(dim=1).double() * (v != 0).any(dim=1).sum(dim=1).double()
        return 1.0 - float(live.sum()) / (self.num_experts * u.shape[1] * v.shape[2])

    def note(self) -> str:
        """What the statistics describe."""
        return (f"{self.num_experts} experts: statistics of all experts' updates together (the union of their spectra); "
                "ak.analyze(..., experts=True) gives one row per expert")

    # ------------------------------------------------------------------ LoRA form

    def keeps_as_lora(self, rank: int | None) -> bool:
        """Kept (PEFT loads it as it is) unless ``rank`` is below the layer's."""
        return rank is None or self.rank <= rank

    def to_lora(self, rank: int | None) -> tuple[Layer, float, float, str]:
        """Kept, or every expert cut to ``rank`` by its exact low-rank SVD (QR of the factors, SVD of the core).

        The result is an ExpertLoRA of rank ``rank`` (``alpha = rank``, scale 1) that PEFT loads with
        ``target_parameters``; the retained energy and relative error are those of the whole parameter.
        """
        if self.keeps_as_lora(rank):
            return self, 1.0, 0.0, "kept"
        u, v = self._factors(torch.float64)
        ups, downs, total, kept = [], [], 0.0, 0.0
        for e in range(self.num_experts):
            left, s, right = lowrank_svd_parts([u[e]], [v[e]])
            total += float((s**2).sum())
            kept += float((s[:rank] ** 2).sum())
            a, b = split_factors(left, s, right, rank)
            pad = rank - a.shape[1]  # an expert whose factors have fewer than `rank` directions
            ups.append(torch.nn.functional.pad(a, (0, pad)))
            downs.append(torch.nn.functional.pad(b, (0, 0, 0, pad)))
        energy = kept / total if total > 0 else 1.0
        dtype = layer_dtype(self)
        new = dataclasses.replace(self, up=torch.stack(ups).to(dtype), down=torch.stack(downs).to(dtype),
                                  alpha=float(rank), rslora=False)
        return new, energy, max(0.0, 1.0 - energy) ** 0.5 if total > 0 else 0.0, "svd"


def expert_delta64(layer: ExpertLoRA) -> torch.Tensor:
    """A float64 reference of the delta from PEFT's own einsum (for tests and checks)."""
    a, b = to_peft(layer.down.double(), layer.up.double())
    e = layer.num_experts
    wa = a.reshape(e, -1, a.shape[-1])
    wb = b.reshape(b.shape[0], -1, e)
    eq = "o r e, e r i -> e i o" if layer.fan_in_fan_out else "o r e, e r i -> e o i"
    return (torch.einsum(eq, wb, wa) * layer.scale).reshape(layer.shape)


__all__ = ["ExpertLoRA", "expert_delta64", "from_peft", "to_peft"]
