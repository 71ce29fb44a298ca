"""How adapters relate to each other: cosine similarity of their updates, sign conflicts, shared targets.

For every pair of adapters and every module both adapt, :func:`compare` reports

* ``cosine``: ``<dW_a, dW_b> / (||dW_a||_F ||dW_b||_F)``. For LoRA (and LoHa without Tucker cores) the
  inner product stays low-rank: ``<U_a V_a, U_b V_b> = trace((U_a^T U_b)(V_b V_a^T))``, an ``r_a x r_b``
  computation; other kinds use the dense deltas.
* ``sign_conflict``: the TIES view. Keep each adapter's top-``k`` entries of ``dW`` by magnitude, with
  ``k = int(density * entries)`` (``density`` = the fraction TIES keeps, 0.2 by default; the count TIES' and
  magnitude pruning's merges keep, :func:`~adaptkit.core.params.kept_entries`); among the positions both keep,
  the fraction whose signs differ. Unrelated updates give about 0.5, aligned ones near 0.
* ``topk_overlap``: ``|top_a & top_b| / k``, how much the two kept sets coincide (``density`` by chance).

Sign statistics need individual entries of ``dW``. Up to ``max_entries`` entries per layer they are all
used; above that, the same ``max_entries`` uniformly drawn positions (seeded) are used for both adapters
and the row says ``sampled``; for factored kinds those entries are computed from the factors, so a
200k x 200k LoRA layer is never built.

IA3 layers are compared through their multipliers' deviation from identity, ``l - 1`` (cosine and sign
conflict of those vectors); IA3 against another kind is not comparable and is marked so.

Per pair, the target sets are compared (shared modules, modules only one adapter changes, Jaccard index),
and :func:`suggest_merge` turns the pooled figures into a merge method suggestion.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.kinds import Layer, layer_is_finite
from ..core.kinds.base import math_shape
from ..core.params import DENSITY, SEED, kept_entries
from ..core.params import MAX_ENTRIES as MAX_ENTRIES_PARAM
from ..errors import ConfigError
from ..formats.inputs import as_adapter
from ..progress import bar
from .layers import (
    adapter_name,
    analyze_adapter,
    natural_key,
)
from .report import require_matplotlib, write_compare_report
from .results import Comparison

DEFAULT_DENSITY = 0.2
MAX_ENTRIES = 1 << 20

LAYER_COLUMNS = ("module", "a", "b", "kind_a", "kind_b", "norm_a", "norm_b", "cosine", "sign_conflict",
                 "topk_overlap", "topk_shared", "sampled", "note")
PAIR_COLUMNS = ("a", "b", "shared_layers", "only_a", "only_b", "target_jaccard", "cosine", "sign_conflict",
                "topk_overlap", "suggested_method")

#: thresholds of :func:`suggest_merge`
CONFLICT_HIGH = 0.35
COSINE_ALIGNED = 0.5


# ------------------------------------------------------------------------------------ sign conflicts


def topk_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density * n)`` largest-magnitude entries of a 1-D tensor (zeros never kept).

    ``k`` is the count a merge with this ``density`` keeps (:func:`~adaptkit.core.params.kept_entries`).
    """
    n = values.numel()
    k = kept_entries(density, n)
    if k == 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    mag = values.abs()
    threshold = torch.kthvalue(mag, n - k + 1).values
    return (mag >= threshold) & (mag > 0)


def sign_conflict(a: torch.Tensor, b: torch.Tensor, density: float = DEFAULT_DENSITY) -> tuple[float, float, int]:
    """TIES-style sign conflict of two equally long 1-D tensors of update entries.

    Args:
        a: entries of the first update (flattened, same positions as ``b``).
        b: entries of the second update.
        density: fraction of entries each side keeps (TIES' ``density``), in ``(0, 1]``.

    Returns:
        ``(conflict_rate, topk_overlap, shared)``: among the positions both top-``k`` sets contain
        (``shared`` of them), the fraction with opposite signs (NaN when none); and ``shared / k`` (NaN when
        ``k`` is 0: a density that keeps no entry of so small a layer).
    """
    k = kept_entries(density, a.numel())
    both = topk_mask(a, density) & topk_mask(b, density)
    shared = int(both.sum())
    conflicts = int((both & (torch.sign(a) != torch.sign(b))).sum())
    return (conflicts / shared if shared else math.nan), (shared / k if k else math.nan), shared


# ------------------------------------------------------------------------------------ one layer, one pair


def _entries(layer: Layer, factors: tuple[torch.Tensor, torch.Tensor] | None,
             where: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, chunk: int = 1 << 17) -> torch.Tensor:
    """Entries of the flattened delta: all of them (``where`` None) or at ``where = (flat, rows, cols)``.

    Factored layers compute only the requested entries, ``sum_k U[i, k] V[k, j]``, in float32 (enough to rank
    magnitudes and read signs).
    """
    if factors is None:
        d = layer.delta_matrix().flatten()
        return d if where is None else d[where[0]]
    u, v = factors
    if where is None:
        return (u @ v).flatten()
    _, rows, cols = where
    u32, vt32 = u.float(), v.T.float().contiguous()  # (m, R), (n, R): row gathers are contiguous
    out = torch.empty(rows.numel(), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = (u32[r] * vt32[c]).sum(dim=1)
    return out


def compare_layers(la: Layer, lb: Layer, density: float = DEFAULT_DENSITY, max_entries: int = MAX_ENTRIES,
                   seed: int = 0) -> dict[str, Any]:
    """Compare two layers adapting the same module: norms, cosine, sign conflict (see the module docstring).

    Returns:
        A dict with ``norm_a``, ``norm_b``, ``cosine``, ``sign_conflict``, ``topk_overlap``, ``topk_shared``,
        ``sampled`` and ``note`` (empty, or why some figures are NaN).
    """
    row: dict[str, Any] = {"norm_a": math.nan, "norm_b": math.nan, "cosine": math.nan, "sign_conflict": math.nan,
                           "topk_overlap": math.nan, "topk_shared": None, "sampled": False, "note": ""}
    if not (layer_is_finite(la) and layer_is_finite(lb)):
        row["note"] = "non-finite tensors (NaN/Inf)"
        return row
    if la.has_delta != lb.has_delta:
        scaling = la if not la.has_delta else lb
        row["note"] = f"not comparable: {la.kind} vs {lb.kind} ({scaling.kind.upper()} rescales, the other adds)"
        return row
    if not la.has_delta:  # kinds without a delta (IA3) compare by their update vectors (IA3: l - 1)
        if type(la) is not type(lb) or (la.io_scales()[0] is None) != (lb.io_scales()[0] is None) \
                or la.update_vector().shape != lb.update_vector().shape:
            row["note"] = "not comparable: IA3 vectors scale different sides or lengths"
            return row
        a, b = la.update_vector(), lb.update_vector()
        na, nb = float(a.norm()), float(b.norm())
        row.update(norm_a=na, norm_b=nb, note="IA3: compares l - 1")
        if na > 0 and nb > 0:
            row["cosine"] = float(a @ b) / (na * nb)
        conflict, overlap, shared = sign_conflict(a, b, density)
        row.update(sign_conflict=conflict, topk_overlap=overlap, topk_shared=shared)
        return row
    sa = math_shape(tuple(la.shape), la.fan_in_fan_out)
    sb = math_shape(tuple(lb.shape), lb.fan_in_fan_out)
    m, n = sa[0], math.prod(sa[1:])
    if (m, n) != (sb[0], math.prod(sb[1:])):
        row["note"] = f"not comparable: shapes {tuple(la.shape)} vs {tuple(lb.shape)}"
        return row
    fa, fb = la.factors(torch.float64), lb.factors(torch.float64)
    if fa is None or fb is None:  # a dense kind on either side: entries from the dense deltas
        fa = fb = None
    na, nb, inner = la.fro_norm(), lb.fro_norm(), la.inner(lb)
    row.update(norm_a=na, norm_b=nb)
    if na > 0 and nb > 0:
        row["cosine"] = max(-1.0, min(1.0, inner / (na * nb)))
    where = None
    if m * n > max_entries:
        gen = torch.Generator().manual_seed(seed)
        flat = torch.randint(0, m * n, (max_entries,), generator=gen)
        where = (flat, flat // n, flat % n)
        row["sampled"] = True
    ea, eb = _entries(la, fa, where), _entries(lb, fb, where)
    conflict, overlap, shared = sign_conflict(ea, eb, density)
    row.update(sign_conflict=conflict, topk_overlap=overlap, topk_shared=shared)
    if la.dora or lb.dora:
        row["note"] = "DoRA: compares the directional updates"
    return row


# ------------------------------------------------------------------------------------ merge suggestion


def suggest_merge(shared_layers: int, cosine: float, conflict: float, density: float = DEFAULT_DENSITY,
                  all_ia3: bool = False, factorwise: bool = True, dora: bool = False) -> tuple[str, str]:
    """Suggest a merge method (a PEFT ``combination_type`` / adaptkit method) from pooled comparison figures.

    Rules, in order: a DoRA adapter (``dora``) -> ``none`` (merging DoRA is undefined without the base weight);
    no shared modules -> ``cat`` (nothing can interfere; the exact sum is a concatenation);
    IA3 only -> ``linear`` (PEFT merges IA3 vectors by weighted average); no shared module comparable
    (shapes or kinds differ: different base models?) -> ``none``; sign conflict >=
    :data:`CONFLICT_HIGH` -> ``ties`` (sign election; ``dare_ties`` also fits); cosine >= :data:`COSINE_ALIGNED`
    -> ``linear`` (aligned updates: averaging keeps the common direction at the same rank); otherwise
    ``task_arithmetic`` (low interference: the exact sum keeps both). Without ``factorwise`` (the shared
    layers are not all LoRA of one rank per layer, as PEFT's factor-wise ``ties`` and ``linear`` need),
    ``ties`` becomes ``ties_svd`` and ``linear`` becomes ``svd``: the same idea on the dense deltas.

    Returns:
        ``(method, reason)``, the reason one sentence with the figures.
    """
    if dora:
        return "none", ("a DoRA adapter re-normalises the base weight, so no merge method is defined without it: "
                        "fuse the adapters into the base model instead (adaptkit fuse)")
    if shared_layers == 0:
        return "cat", "the adapters share no target module, so they cannot interfere: concatenate (cat) for the exact sum"
    if all_ia3:
        return "linear", "IA3 multipliers merge by weighted average (PEFT's only IA3 combination)"
    if math.isnan(cosine) and math.isnan(conflict):
        return "none", ("no shared module could be compared (shapes or kinds differ, or updates are zero or "
                        "non-finite; see the layer notes): check that the adapters belong to the same base model")
    figures = f"cosine {cosine:.2f}, sign conflict {conflict:.0%} of shared top-{density:.0%} entries"
    ties, dare, linear = ("ties", "dare_ties", "linear") if factorwise else ("ties_svd", "dare_ties_svd", "svd")
    why = "" if factorwise else " (ranks or kinds differ per layer, so on the dense deltas)"
    if not math.isnan(conflict) and conflict >= CONFLICT_HIGH:
        return ties, (f"{figures}: strong sign interference (0.5 = unrelated), so elect signs with {ties} "
                      f"(or {dare}) at density {density:g}{why}")
    if not math.isnan(cosine) and cosine >= COSINE_ALIGNED:
        return linear, (f"{figures}: the updates are aligned, so a weighted average ({linear}) keeps their common "
                        f"direction{why}")
    return "task_arithmetic", (f"{figures}: little interference, so the exact weighted sum (task_arithmetic) keeps "
                               "both; compress with svd if the rank matters")


def _factorwise(a: Layer, b: Layer) -> bool:
    """Whether PEFT's factor-wise methods (``ties``, ``linear``, ...) can merge these two layers: LoRA, equal rank."""
    return a.lora_ab() is not None and b.lora_ab() is not None and a.rank == b.rank


# ------------------------------------------------------------------------------------ adapters


def _pooled(rows: pd.DataFrame) -> tuple[float, float, float]:
    """Global cosine over concatenated deltas, pooled sign conflict and top-k overlap of some layer rows."""
    ok = rows[rows["cosine"].notna()]
    na2, nb2 = float((ok["norm_a"] ** 2).sum()), float((ok["norm_b"] ** 2).sum())
    inner = float((ok["cosine"] * ok["norm_a"] * ok["norm_b"]).sum())
    cosine = inner / math.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else math.nan
    sc = rows[rows["sign_conflict"].notna()]
    shared = sc["topk_shared"].astype(float)
    conflict = float((sc["sign_conflict"] * shared).sum() / shared.sum()) if shared.sum() > 0 else math.nan
    overlap = float(rows["topk_overlap"].mean()) if rows["topk_overlap"].notna().any() else math.nan
    return cosine, conflict, overlap


def _named(adapters: Sequence[Adapter | str | os.PathLike] | Mapping[str, Adapter | str | os.PathLike],
           names: Sequence[str] | None, format: str | None, base: str | None) -> tuple[list[str], list[Adapter]]:
    if isinstance(adapters, Mapping):
        names, adapters = list(adapters.keys()), list(adapters.values())
    loaded = [as_adapter(a, format=format, base=base) for a in adapters]
    if len(loaded) < 2:
        raise ConfigError(f"compare needs at least two adapters, got {len(loaded)}; pass two or more sources")
    if names is not None and len(names) != len(loaded):
        raise ConfigError(f"got {len(names)} names for {len(loaded)} adapters; give one name per adapter")
    base = list(names) if names is not None else [adapter_name(a, f"adapter{i}") for i, a in enumerate(loaded)]
    out: list[str] = []
    for i, n in enumerate(base):
        out.append(n if base.count(n) == 1 else f"{n}#{i}")
    return out, loaded


def compare_adapters(adapters: Sequence[Adapter | str | os.PathLike] | Mapping[str, Adapter | str | os.PathLike], *,
                     names: Sequence[str] | None = None, density: float = DEFAULT_DENSITY,
                     max_entries: int = MAX_ENTRIES, seed: int = 0, format: str | None = None,
                     base: str | None = None, report: str | os.PathLike | None = None,
                     progress: bool | None = None) -> Comparison:
    """Compare two or more adapters layer by layer and pair by pair; optionally write the HTML report.

    Args:
        adapters: adapters or sources (hub ids, directories, files), or a dict name -> adapter/source.
        names: display names (default: from each adapter's source); duplicates get ``#i`` appended.
        density: fraction of entries each adapter keeps for the sign statistics (TIES' ``density``).
        max_entries: above this many entries per layer, sign statistics use this many sampled positions.
        seed: seed of that sampling.
        format: source format when loading (detected when ``None``).
        base: base model (hub id or directory) for formats whose module names need resolving (kohya).
        report: write a self-contained HTML report (similarity heat maps, energy by depth) to this path;
            needs matplotlib.
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).

    Returns:
        A :class:`Comparison`.

    Raises:
        ConfigError: fewer than two adapters, or ``density`` outside ``(0, 1]``.
        UnsupportedError: ``report`` is given and matplotlib is missing (checked before any work).
    """
    density, max_entries, seed = DENSITY.check(density), MAX_ENTRIES_PARAM.check(max_entries), SEED.check(seed)
    if report is not None:
        require_matplotlib()
    names_, loaded = _named(adapters, names, format, base)
    layer_rows, pair_rows = [], []
    factorwise = True
    all_own = True  # every shared layer of every pair merges in its own parameters (IA3: no delta)
    steps = sum(len(set(a.layers) & set(b.layers)) for a, b in combinations(loaded, 2))
    meter = bar(desc="compare", total=steps, unit="layer", progress=progress)
    for (i, a), (j, b) in combinations(enumerate(loaded), 2):
        shared = sorted(set(a.layers) & set(b.layers), key=natural_key)
        rows = []
        pair_own = True
        for path in shared:
            la, lb = a.layers[path], b.layers[path]
            row = {"module": path, "a": names_[i], "b": names_[j], "kind_a": la.kind, "kind_b": lb.kind}
            row.update(compare_layers(la, lb, density=density, max_entries=max_entries, seed=seed))
            rows.append(row)
            pair_own = pair_own and not la.has_delta and not lb.has_delta
            meter.update(1)
        layer_rows.extend(rows)
        table = pd.DataFrame(rows, columns=list(LAYER_COLUMNS))
        cosine, conflict, overlap = _pooled(table) if rows else (math.nan, math.nan, math.nan)
        union = len(set(a.layers) | set(b.layers))
        all_ia3 = bool(rows) and pair_own
        all_own = all_own and pair_own
        pair_factorwise = all(_factorwise(a.layers[p], b.layers[p]) for p in shared)
        factorwise = factorwise and pair_factorwise
        method, _ = suggest_merge(len(shared), cosine, conflict, density, all_ia3, pair_factorwise,
                                  bool(a.dora_layers() or b.dora_layers()))
        pair_rows.append({"a": names_[i], "b": names_[j], "shared_layers": len(shared),
                          "only_a": len(set(a.layers) - set(b.layers)), "only_b": len(set(b.layers) - set(a.layers)),
                          "target_jaccard": len(shared) / union if union else math.nan, "cosine": cosine,
                          "sign_conflict": conflict, "topk_overlap": overlap, "suggested_method": method})
    meter.close()
    layers = pd.DataFrame(layer_rows, columns=list(LAYER_COLUMNS))
    layers["topk_shared"] = layers["topk_shared"].astype(object).where(layers["topk_shared"].notna(), None)
    pairs = pd.DataFrame(pair_rows, columns=list(PAIR_COLUMNS))
    cosine, conflict, _ = _pooled(layers) if len(layers) else (math.nan, math.nan, math.nan)
    all_ia3 = bool(len(layers)) and all_own
    method, reason = suggest_merge(int(pairs["shared_layers"].sum()), cosine, conflict, density, all_ia3, factorwise,
                                   any(a.dora_layers() for a in loaded))
    result = Comparison(names=tuple(names_), layers=layers, pairs=pairs, method=method, reason=reason, density=density)
    if report is not None:
        analyses = [analyze_adapter(ad, name=nm, progress=progress) for nm, ad in zip(names_, loaded)]
        write_compare_report(result, analyses, report)
    return result


def compare(adapters: Sequence[Adapter | str | os.PathLike] | Mapping[str, Adapter | str | os.PathLike], *,
            density: float = DEFAULT_DENSITY, max_entries: int = MAX_ENTRIES, seed: int = 0,
            format: str | None = None, base: str | None = None) -> pd.DataFrame:
    """Per module and pair: cosine similarity of ``dW``, TIES sign-conflict rate and top-k overlap.

    Args:
        adapters: two or more adapters or sources, or a dict name -> adapter/source.
        density: fraction of entries each adapter keeps for the sign statistics (TIES' ``density``).
        max_entries: above this many entries per layer, sign statistics use sampled positions.
        seed: seed of that sampling.
        format: source format when loading.
        base: base model for formats whose module names need resolving (kohya).

    Returns:
        The per-layer DataFrame (:data:`LAYER_COLUMNS`). ``df.attrs`` holds ``"pairs"`` (records of the per-pair summary
        with target-set overlap and a suggested method), ``"suggestion"`` (method) and ``"reason"``; use
        :func:`compare_adapters` for the full :class:`Comparison`.

    Example:
        >>> import adaptkit as ak
        >>> df = ak.compare(["org/math-lora", "org/code-lora"])
        >>> df.attrs["suggestion"], df.attrs["reason"]
    """
    result = compare_adapters(adapters, density=density, max_entries=max_entries, seed=seed, format=format,
                              base=base)
    table = result.layers.copy()
    table.attrs.update(pairs=result.pairs.to_dict(orient="records"), suggestion=result.method, reason=result.reason)
    return table


__all__ = [
    "CONFLICT_HIGH",
    "COSINE_ALIGNED",
    "DEFAULT_DENSITY",
    "LAYER_COLUMNS",
    "MAX_ENTRIES",
    "PAIR_COLUMNS",
    "Comparison",
    "compare",
    "compare_adapters",
    "compare_layers",
    "sign_conflict",
    "suggest_merge",
    "topk_mask",
]
