"""The one table of merge methods, each a row of parts: operand x sparsify x sign consensus x output.

This module imports no torch, so that ``adaptkit merge --help`` lists the methods (with their one-line summaries and
parameters) from the table itself; :mod:`.methods` holds the element-wise combination the rows drive.

* ``operand``: what the combination works on. ``"factors"``: PEFT's ``linear``/``ties``/``dare_*``/
  ``magnitude_prune`` combine the ``A`` matrices and the ``B`` matrices separately, with weight
  ``sqrt(|w s|)`` on each (the sign on ``A``); the result keeps the inputs' rank. ``"delta"``: the dense
  ``dW_i = s_i B_i A_i`` are combined element-wise, then truncated by SVD. ``"lowrank"``: a plain weighted
  sum that never leaves factor form (concatenation, or the exact low-rank SVD of :mod:`.lowrank`).
  ``"subspace"``: LoRA-native methods (:mod:`.subspace`) that align the inputs' factors in shared bases and combine
  small coefficient matrices there; no ``m x n`` matrix is built.
* ``sparsify``: ``None``, ``"magnitude"`` (keep the top ``density``), ``"random"`` (DARE: keep with
  probability ``density``, rescale by ``1/density``), ``"outliers"`` (Model Breadcrumbs: drop the top ``gamma``
  and the smallest, ``density`` remains) or ``"rank_magnitude"`` (DELLA: keep with a probability that grows with
  the magnitude rank in the row, ``density +- epsilon``, rescale by ``1/p``).
* ``consensus``: TIES sign election + disjoint mean instead of a weighted sum.
* ``output``: ``"same"`` (rank of the inputs), ``"concat"`` (sum of ranks, exact), ``"svd"`` (truncated to
  ``rank``), ``"exact_or_svd"`` (the method's own rank without ``rank``, exact low-rank SVD with one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ...errors import ConfigError


class Operand(StrEnum):
    """What a method combines (see the module docstring)."""

    FACTORS = "factors"
    DELTA = "delta"
    LOWRANK = "lowrank"
    SUBSPACE = "subspace"


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
        subspace: for ``operand="subspace"``: the name of its function in
            :data:`adaptkit.ops.merging.subspace.SUBSPACE` (KnOTS, TSV-M, Iso-C/CTS, core space), which gets the
            layers' exact factors; sparsify and consensus then apply to the aligned coefficients it builds.
        extra: the method's own parameters beyond density / rank / seed / gamma / epsilon (``keep``, ``common``).
    """

    name: str
    operand: Operand
    sparsify: Sparsify | None
    consensus: bool
    output: Output
    peft: bool
    summary: str
    subspace: str | None = None
    extra: tuple[str, ...] = ()

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

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters the method takes (``--density`` ...), for help texts and checks."""
        out = ["weights"]
        if self.needs_density:
            out.append("density")
        if self.takes_rank:
            out.append("rank")
        if self.consensus:
            out.append("majority_sign")
        if self.random:
            out.append("seed")
        if self.needs_gamma:
            out.append("gamma")
        if self.needs_epsilon:
            out.append("epsilon")
        return (*out, *self.extra)


def _m(name: str, operand: str, sparsify: str | None, consensus: bool, output: str, summary: str,
       peft: bool = True, subspace: str | None = None, extra: tuple[str, ...] = ()) -> Method:
    return Method(name, Operand(operand), None if sparsify is None else Sparsify(sparsify), consensus, Output(output),
                  peft, summary, subspace, extra)


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
    _m("knots", "subspace", "magnitude", True, "exact_or_svd",
       "KnOTS: SVD of the concatenated deltas into one basis, TIES on the aligned per-task coefficients",
       peft=False, subspace="knots"),
    _m("knots_dare", "subspace", "random", True, "exact_or_svd",
       "KnOTS with DARE-TIES on the aligned per-task coefficients", peft=False, subspace="knots"),
    _m("tsv", "subspace", None, False, "exact_or_svd",
       "TSV-M: each task's top singular vectors, whitened (orthogonalised) together, task spectra kept",
       peft=False, subspace="tsv", extra=("keep",)),
    _m("iso_c", "subspace", None, False, "exact_or_svd",
       "Iso-C: task arithmetic with a flat spectrum (every singular value the mean)", peft=False,
       subspace="iso_c"),
    _m("iso_cts", "subspace", None, False, "exact_or_svd",
       "Iso-CTS: common subspace of the sum plus task-specific directions, whitened, flat spectrum",
       peft=False, subspace="iso_cts", extra=("common",)),
    _m("core_linear", "subspace", None, False, "exact_or_svd",
       "core space: the weighted sum of the cores in the inputs' shared SVD bases (exactly task arithmetic)",
       peft=False, subspace="core"),
    _m("core_ties", "subspace", "magnitude", True, "exact_or_svd",
       "core space: TIES on the small cores in the inputs' shared SVD bases", peft=False, subspace="core"),
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




def help_text() -> str:
    """The methods for ``adaptkit merge --help``: name, one-line summary and parameters, one method per line."""
    lines = []
    for m in METHODS.values():
        params = ", ".join(p for p in m.params if p != "weights")
        lines.append(f"{m.name}: {m.summary}" + (f" [{params}]" if params else ""))
    return "\n".join(lines)


__all__ = ["METHODS", "PEFT_METHODS", "Method", "Operand", "Output", "Sparsify", "get_method", "help_text"]
