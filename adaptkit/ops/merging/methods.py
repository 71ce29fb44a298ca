"""The one table of merge methods, each built from parts: operand x sparsify x sign consensus x output.

* ``operand``: what the combination works on. ``"factors"``: PEFT's ``linear``/``ties``/``dare_*``/
  ``magnitude_prune`` combine the ``A`` matrices and the ``B`` matrices separately, with weight
  ``sqrt(|w s|)`` on each (the sign on ``A``); the result keeps the inputs' rank. ``"delta"``: the dense
  ``dW_i = s_i B_i A_i`` are combined element-wise, then truncated by SVD. ``"lowrank"``: a plain weighted
  sum that never leaves factor form (concatenation, or the exact low-rank SVD of :mod:`.lowrank`).
* ``sparsify``: ``None``, ``"magnitude"`` (keep the top ``density``), ``"random"`` (DARE: keep with
  probability ``density``, rescale by ``1/density``), ``"outliers"`` (Model Breadcrumbs: drop the top ``gamma``
  and the smallest, ``density`` remains) or ``"rank_magnitude"`` (DELLA: keep with a probability that grows with
  the magnitude rank in the row, ``density +- epsilon``, rescale by ``1/p``).
* ``consensus``: TIES sign election + disjoint mean instead of a weighted sum.
* ``output``: ``"same"`` (rank of the inputs), ``"concat"`` (sum of ranks, exact), ``"svd"`` (truncated to
  ``rank``), ``"exact_or_svd"`` (concat without ``rank``, low-rank SVD with one).

:func:`combine` runs sparsify -> elect -> weigh -> combine on a list of same-shaped tensors, exactly as
``peft.utils.merge_utils`` orders those steps (the sign is elected on the unweighted, pruned tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from ...errors import ConfigError
from .primitives import (
    check_density,
    disjoint_mean_,
    elected_sign,
    magnitude_prune_rows_,
    outlier_prune,
    prune,
    rank_magnitude_prune,
    weighted_sum,
    weighted_sum_,
)

#: tensors of at most this many entries are stacked for pruning when they are not the caller's to overwrite
_STACK_MAX = 1 << 22


class Operand(StrEnum):
    """What a method combines (see the module docstring)."""

    FACTORS = "factors"
    DELTA = "delta"
    LOWRANK = "lowrank"


class Sparsify(StrEnum):
    """How a method drops entries before combining: keep the largest, or DARE's random keep + rescale."""

    MAGNITUDE = "magnitude"
    RANDOM = "random"
    OUTLIERS = "outliers"
    RANK_MAGNITUDE = "rank_magnitude"


class Output(StrEnum):
    """The rank of a method's result."""

    SAME = "same"
    CONCAT = "concat"
    SVD = "svd"
    EXACT_OR_SVD = "exact_or_svd"


@dataclass(frozen=True)
class Method:
    """One merge method, described by its parts.

    Args:
        name: the method's name (PEFT's ``combination_type`` where PEFT has it).
        operand: ``"factors"``, ``"delta"`` or ``"lowrank"`` (see the module docstring).
        sparsify: ``None``, ``"magnitude"`` or ``"random"``.
        consensus: TIES sign election and disjoint mean.
        output: ``"same"``, ``"concat"``, ``"svd"`` or ``"exact_or_svd"``.
        peft: PEFT's ``add_weighted_adapter`` has it (and its single-adapter rule applies).
        summary: one line for help texts.
    """

    name: str
    operand: Operand
    sparsify: Sparsify | None
    consensus: bool
    output: Output
    peft: bool
    summary: str

    @property
    def needs_density(self) -> bool:
        """Whether ``density`` is required."""
        return self.sparsify is not None

    @property
    def takes_rank(self) -> bool:
        """Whether ``rank`` means something (the output is truncated by SVD)."""
        return self.output in (Output.SVD, Output.EXACT_OR_SVD)

    @property
    def random(self) -> bool:
        """Whether the method draws random numbers (``seed`` applies)."""
        return self.sparsify in (Sparsify.RANDOM, Sparsify.RANK_MAGNITUDE)

    @property
    def needs_gamma(self) -> bool:
        """Whether ``gamma`` (the outlier fraction of Model Breadcrumbs) applies."""
        return self.sparsify is Sparsify.OUTLIERS

    @property
    def needs_epsilon(self) -> bool:
        """Whether ``epsilon`` (DELLA's spread of keep probabilities) applies."""
        return self.sparsify is Sparsify.RANK_MAGNITUDE

    @property
    def equal_ranks(self) -> bool:
        """Whether every input must have the same rank at a layer (factor-wise combination)."""
        return self.operand is Operand.FACTORS


def _m(name: str, operand: str, sparsify: str | None, consensus: bool, output: str, summary: str,
       peft: bool = True) -> Method:
    return Method(name, Operand(operand), None if sparsify is None else Sparsify(sparsify), consensus, Output(output),
                  peft, summary)


#: every merge method, by name
METHODS: dict[str, Method] = {m.name: m for m in (
    _m("svd", "lowrank", None, False, "svd", "weighted sum of deltas, truncated SVD to rank (exact low-rank SVD)"),
    _m("linear", "factors", None, False, "same", "weighted sum of A's and of B's separately (cross terms; same rank)"),
    _m("cat", "lowrank", None, False, "concat", "concatenate weighted factors: the exact sum, rank = sum of ranks"),
    _m("ties", "factors", "magnitude", True, "same", "TIES on A's and B's separately: trim, elect sign, disjoint mean"),
    _m("ties_svd", "delta", "magnitude", True, "svd", "TIES on the dense deltas, then truncated SVD to rank"),
    _m("dare_linear", "factors", "random", False, "same", "DARE drop + rescale on A's and B's, weighted sum"),
    _m("dare_ties", "factors", "random", True, "same", "DARE drop + rescale on A's and B's, then TIES sign merge"),
    _m("dare_linear_svd", "delta", "random", False, "svd", "DARE on the dense deltas, weighted sum, truncated SVD"),
    _m("dare_ties_svd", "delta", "random", True, "svd", "DARE on the dense deltas, TIES sign merge, truncated SVD"),
    _m("magnitude_prune", "factors", "magnitude", False, "same", "magnitude pruning of A's and B's, weighted sum"),
    _m("magnitude_prune_svd", "delta", "magnitude", False, "svd", "magnitude pruning of dense deltas, SVD to rank"),
    _m("task_arithmetic", "lowrank", None, False, "exact_or_svd",
       "exact sum of weighted deltas: concatenated factors, or exact low-rank SVD to rank", peft=False),
    _m("breadcrumbs", "delta", "outliers", False, "svd",
       "Model Breadcrumbs on dense deltas: drop top gamma and smallest, weighted sum, SVD to rank", peft=False),
    _m("breadcrumbs_ties", "delta", "outliers", True, "svd",
       "Model Breadcrumbs on dense deltas, then TIES sign merge, SVD to rank", peft=False),
    _m("della", "delta", "rank_magnitude", True, "svd",
       "DELLA MagPrune (rank-based keep p, rescale 1/p) on dense deltas, TIES sign merge, SVD", peft=False),
    _m("della_linear", "delta", "rank_magnitude", False, "svd",
       "DELLA MagPrune on dense deltas, weighted sum, SVD to rank", peft=False),
)}

#: PEFT's combination types, in the order of its documentation
PEFT_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.peft)


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower()
    if key not in METHODS:
        raise ConfigError(f"unknown merge method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[key]


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: Method, density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None,
            owned: bool = False, gamma: float | None = None, epsilon: float | None = None) -> torch.Tensor:
    """Combine same-shaped tensors with a method's element-wise parts (sparsify, elect, weigh, combine).

    Equal to ``peft.utils.merge_utils`` (``ties``, ``dare_*``, ``magnitude_prune``, ``task_arithmetic``) but
    streams over the inputs instead of stacking them, and works in place on the pruned (or ``owned``)
    tensors with one float and one bool scratch buffer for all of them (see :mod:`.primitives`).

    Args:
        tensors: one tensor per input (float32, contiguous). The list is consumed: its entries are replaced
            by their pruned versions so that the originals can be freed.
        weights: one weight per input (1-D float tensor).
        method: the method whose ``sparsify`` and ``consensus`` parts apply.
        density: keep fraction for sparsification.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES).
        generator: random generator for DARE.
        owned: the tensors belong to the caller's computation (e.g. freshly built deltas) and may be
            overwritten; otherwise they are read only.
        gamma: outlier fraction (``"outliers"`` sparsification, default 0).
        epsilon: spread of keep probabilities (``"rank_magnitude"`` sparsification, default 0). Each tensor
            draws from ``generator`` in list order.

    Returns:
        The combined tensor.
    """
    w = [weights[i].to(tensors[i].dtype) for i in range(len(tensors))]
    if method.sparsify is None and not method.consensus:
        return weighted_sum_(tensors, w) if owned else weighted_sum(tensors, w)
    first = tensors[0]
    scratch = torch.empty_like(first, memory_format=torch.contiguous_format)
    mask = torch.empty(first.shape, dtype=torch.bool)
    if method.sparsify is not None:
        if density is None:
            raise ConfigError(f"method '{method.name}' needs density (the fraction of entries to keep, 0 < density <= 1)")
        random = method.sparsify is Sparsify.RANDOM
        if method.sparsify is Sparsify.OUTLIERS:
            check_density(density)
            tensors[:] = [outlier_prune(t if owned else t.clone(), density, gamma or 0.0) for t in tensors]
        elif method.sparsify is Sparsify.RANK_MAGNITUDE:
            check_density(density)
            tensors[:] = [rank_magnitude_prune(t if owned else t.clone(), density, epsilon or 0.0, generator)
                          for t in tensors]
        elif not owned and first.numel() <= _STACK_MAX:  # small tensors (factors): prune them stacked, then own them
            rows = torch.stack(tensors)
            if random:
                prune(rows, density, "random", rescale=True, generator=generator, inplace=True)
            else:
                check_density(density)
                magnitude_prune_rows_(rows, density)
            tensors[:] = list(rows)
        else:
            for i, t in enumerate(tensors):
                t = t if owned else t.clone(memory_format=torch.contiguous_format)
                tensors[i] = prune(t, density, method.sparsify, rescale=random, generator=generator, inplace=True,
                                   scratch=scratch, mask=mask)
    elif not owned:
        tensors[:] = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    if not method.consensus:
        return weighted_sum_(tensors, w)
    sign = elected_sign(tensors, majority_sign_method, out=scratch, scratch=torch.empty_like(scratch)
                        if majority_sign_method == "frequency" and len(tensors) > 1 else None)
    return disjoint_mean_(tensors, w, sign, mask)


__all__ = ["METHODS", "PEFT_METHODS", "Method", "Operand", "Output", "Sparsify", "combine", "get_method"]
