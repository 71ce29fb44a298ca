"""What is inside an adapter, layer by layer: norms, spectra, effective rank, energy, sparsity.

Every statistic describes the layer's weight update ``dW`` in the math orientation, flattened to a matrix
``(out, in * prod(kernel))``. The singular values are computed without building ``dW`` where the kind
allows it:

* **LoRA** (also DoRA's directional update, rsLoRA, Tucker ``mid``): ``dW = U V`` with ``U`` ``(m, r)`` and
  ``V`` ``(r, n)``. Thin QRs ``U = Q_u R_u`` and ``V^T = Q_v R_v`` give ``dW = Q_u (R_u R_v^T) Q_v^T``, so
  the singular values of ``dW`` are those of the ``r x r`` core ``R_u R_v^T``. Cost ``O((m + n) r^2)``.
* **LoHa** without Tucker cores: ``(A_1 B_1) * (A_2 B_2) = U V`` with ``U`` the row-wise Kronecker product
  of ``A_1, A_2`` (``m x r^2``) and ``V`` the column-wise Khatri-Rao product of ``B_1, B_2``
  (``r^2 x n``): the same QR path at rank ``r^2``.
* **LoKr** with 2-D factors: the singular values of ``kron(W_1, W_2)`` are the products of those of
  ``W_1`` and ``W_2``.
* Everything else (Full diffs, conv LoKr, Tucker LoHa) is dense: ``torch.linalg.svdvals`` of ``dW``.
* **IA3** has no base-free ``dW`` (it rescales the base weight): its row carries no ``dW`` statistics,
  only a note with the statistics of its multiplier vector ``l``.

The per-layer table comes from :func:`analyze`; :func:`analyze_adapter` also keeps the spectra (for the
report). Cross-adapter similarity and sign conflicts live in :mod:`adaptkit.comparison`; plots and the HTML
report in :mod:`adaptkit.report` (needs matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..core.adapter import Adapter
from ..core.kinds import Layer, layer_is_finite
from ..core.linalg import energy_rank as energy_rank_of
from ..formats.inputs import as_adapter
from ..progress import bar
from .depth import Position, first_index, module_positions
from .report import require_matplotlib, write_analysis_report
from .results import AdapterAnalysis

#: columns of :func:`analyze`, in order
COLUMNS = ("module", "kind", "shape", "component", "depth", "rank", "scale", "dora", "fro_norm", "spectral_norm",
           "stable_rank", "effective_rank", "rank_90", "rank_99", "energy_share", "sparsity", "finite", "method", "note")


# ------------------------------------------------------------------------------------ low-rank algebra


def layer_spectrum(layer: Layer) -> tuple[np.ndarray, str]:
    """Singular values of a layer's delta (descending, float64) and how they were computed (the kind's ``spectrum``).

    Args:
        layer: an adapter layer with a base-free delta.

    Returns:
        ``(singular_values, method)`` with ``method`` one of ``"lowrank"``, ``"kron"``, ``"dense"``.
    """
    s, method = layer.spectrum()
    return s.numpy(), method


def layer_sparsity(layer: Layer) -> float:
    """Fraction of the entries of the flattened ``dW`` that are exactly zero (the kind's ``sparsity``).

    Factored kinds count structural zeros without building ``dW``: an entry of ``U V`` is zero when its row of
    ``U`` or its column of ``V`` is all zero, and a Kronecker entry when either factor entry is.
    """
    return layer.sparsity()


# ------------------------------------------------------------------------------------ spectral statistics


@dataclass(frozen=True)
class SpectrumStats:
    """Scalar summaries of a singular-value spectrum ``s`` (see :func:`spectrum_stats` for definitions)."""

    fro_norm: float
    spectral_norm: float
    stable_rank: float
    effective_rank: float
    rank_90: int
    rank_99: int


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """The smallest ``k`` with ``sum(s[:k]**2) >= fraction * sum(s**2)`` (0 if all zero; see :func:`linalg.energy_rank`)."""
    ordered = np.sort(np.abs(np.asarray(s, dtype=np.float64)))[::-1].copy()
    return energy_rank_of(ordered, fraction, rtol=1e-12)


def spectrum_stats(s: np.ndarray) -> SpectrumStats:
    """Norms and rank measures of a matrix from its singular values ``s`` (descending or not).

    Definitions (``s_i`` the singular values, zeros dropped where a ratio needs it):

    * ``fro_norm`` = ``sqrt(sum s_i^2)`` (``||dW||_F``); ``spectral_norm`` = ``max s_i`` (``||dW||_2``).
    * ``stable_rank`` = ``||dW||_F^2 / ||dW||_2^2`` = ``sum s_i^2 / max s_i^2``.
    * ``effective_rank`` (Roy & Vetterli, 2007) = ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and the
      Shannon entropy ``H(p) = -sum_i p_i ln p_i`` (``0 ln 0 = 0``): between 1 (one direction) and the rank
      (all directions equally strong).
    * ``rank_90`` / ``rank_99`` = :func:`energy_rank` at 0.90 / 0.99: how many directions hold 90% / 99% of
      ``||dW||_F^2``.

    An all-zero spectrum gives norms 0, ranks 0 and NaN for the two ratios.
    """
    s = np.abs(np.asarray(s, dtype=np.float64))
    total2 = float((s**2).sum())
    top = float(s.max()) if s.size else 0.0
    if top <= 0:
        return SpectrumStats(0.0, 0.0, math.nan, math.nan, 0, 0)
    p = s[s > 0] / s.sum()
    entropy = float(-(p * np.log(p)).sum())
    return SpectrumStats(
        fro_norm=math.sqrt(total2),
        spectral_norm=top,
        stable_rank=total2 / top**2,
        effective_rank=math.exp(entropy),
        rank_90=energy_rank(s, 0.90),
        rank_99=energy_rank(s, 0.99),
    )


# ------------------------------------------------------------------------------------ per-layer table


def module_depth(path: str) -> int | None:
    """The block index of one module path: its first all-digit component (``model.layers.3.mlp`` -> 3).

    This is the rule for LLM-style paths only; the ``depth`` column comes from
    :func:`adaptkit.depth.module_positions`, which knows pipeline components and UNet block order.
    """
    return first_index(path)


def _shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape) if shape is not None else "?"


def analyze_layer(path: str, layer: Layer, position: Position | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """One row of :func:`analyze` (``energy_share`` still unset) and the layer's spectrum (``None`` for IA3).

    Args:
        path: module path.
        layer: the layer.
        position: the module's component and depth among all the adapter's paths
            (:func:`adaptkit.depth.module_positions`); computed from this path alone when ``None``.
    """
    if position is None:
        position = module_positions([path])[path]
    dora = layer.dora
    row: dict[str, Any] = {
        "module": path, "kind": layer.kind, "shape": _shape_text(layer.shape), "component": position.component,
        "depth": position.depth,
        "rank": layer.rank, "scale": float(layer.scale), "dora": dora, "fro_norm": math.nan,
        "spectral_norm": math.nan, "stable_rank": math.nan, "effective_rank": math.nan, "rank_90": None,
        "rank_99": None, "energy_share": math.nan, "sparsity": math.nan, "finite": layer_is_finite(layer),
        "method": "-", "note": "",
    }
    if layer.additive and layer.shape is None:  # PEFT VeRA, WaveFT ... files: the delta needs the weight shape
        row["note"] = "the file stores no weight shape: statistics need the base model (--base / base=)"
        return row, None
    if not layer.has_delta:  # IA3: no base-free dW, only a note on its multiplier
        row["note"] = layer.note()
        return row, None
    if not row["finite"]:
        row["note"] = "non-finite tensors (NaN/Inf): statistics skipped"
        return row, None
    s, method = layer_spectrum(layer)
    stats = spectrum_stats(s)
    row.update(fro_norm=stats.fro_norm, spectral_norm=stats.spectral_norm, stable_rank=stats.stable_rank,
               effective_rank=stats.effective_rank, rank_90=stats.rank_90, rank_99=stats.rank_99,
               sparsity=layer_sparsity(layer), method=method)
    row["note"] = layer.note()  # e.g. DoRA: the statistics describe the directional update
    return row, s


def adapter_name(adapter: Adapter, fallback: str = "adapter") -> str:
    """A short display name: the adapter's own name unless it is PEFT's ``default``, else its source's basename."""
    if adapter.name and adapter.name != "default":
        return adapter.name
    if adapter.source:
        base = os.path.basename(str(adapter.source).rstrip("/\\")) or str(adapter.source)
        return base.split("@")[0] or fallback
    return fallback


def analyze_adapter(adapter_or_source: Adapter | str | os.PathLike, *, format: str | None = None,
                    base: str | None = None, name: str | None = None,
                    report: str | os.PathLike | None = None, progress: bool | None = None,
                    experts: bool = False) -> AdapterAnalysis:
    """Analyse every layer of an adapter and keep the spectra; optionally write the HTML report.

    Args:
        adapter_or_source: an :class:`Adapter`, or a hub id / directory / file to load.
        format: source format when loading (detected when ``None``).
        base: base model (hub id or directory) for formats whose module names need resolving (kohya).
        name: display name (default: :func:`adapter_name`).
        report: write a self-contained HTML report to this path (replaced if it exists); needs matplotlib.
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).
        experts: one row per expert for layers on stacked expert parameters (PEFT ``target_parameters``), with an
            ``expert`` column after ``module`` (``None`` for other layers); their spectra are keyed ``path[e]``.

    Returns:
        An :class:`AdapterAnalysis` (``.table`` is what :func:`analyze` returns).

    Raises:
        UnsupportedError: ``report`` is given and matplotlib is not installed (checked before any work).
    """
    if report is not None:
        require_matplotlib()
    adapter = as_adapter(adapter_or_source, format=format, base=base)
    rows, spectra = [], {}
    positions = module_positions(adapter.layers)
    for path in bar(sorted(adapter.layers, key=natural_key), desc="analyze", unit="layer", progress=progress):
        layer = adapter.layers[path]
        per_expert = layer.experts() if experts else None
        pieces = [(None, layer)] if per_expert is None else list(per_expert.items())
        for index, piece in pieces:
            row, s = analyze_layer(path, piece, positions[path])
            if index is not None:
                row.update(kind=layer.kind, expert=index)
            rows.append(row)
            if s is not None:
                spectra[path if index is None else f"{path}[{index}]"] = s
    columns = list(COLUMNS) if not experts else [COLUMNS[0], "expert", *COLUMNS[1:]]
    table = pd.DataFrame(rows, columns=columns)
    if experts:
        table["expert"] = table["expert"].astype(object).where(table["expert"].notna(), None)
    for col in ("rank", "rank_90", "rank_99"):
        table[col] = table[col].astype(object).where(table[col].notna(), None)
    table["depth"] = pd.Series([r["depth"] for r in rows], index=table.index, dtype=object)  # ints stay ints
    energy = table["fro_norm"] ** 2
    total = float(energy.sum(skipna=True))
    table["energy_share"] = energy / total if total > 0 else math.nan
    result = AdapterAnalysis(name=name or adapter_name(adapter), table=table, spectra=spectra, source=adapter.source)
    if report is not None:
        write_analysis_report(result, report)
    return result


def analyze(adapter_or_source: Adapter | str | os.PathLike, *, format: str | None = None,
            base: str | None = None, experts: bool = False) -> pd.DataFrame:
    """Per-layer analysis of an adapter's weight updates, one row per layer.

    Computed in the low-rank space for LoRA (and LoHa): QR of the factors and an SVD of the ``r x r`` core,
    never the dense ``m x n`` delta; dense only for kinds that need it (see the module docstring).

    Args:
        adapter_or_source: an :class:`Adapter`, or a hub id / directory / file to load.
        format: source format when loading (detected when ``None``).
        base: base model (hub id or directory) for formats whose module names need resolving (kohya).
        experts: one row per expert for layers on stacked expert parameters, with an ``expert`` column (see
            :func:`analyze_adapter`).

    Returns:
        A DataFrame with columns :data:`COLUMNS`: ``module``, ``kind``, ``shape`` (module weight shape),
        ``component`` (pipeline component: ``unet``, ``text_encoder``, ...; ``""`` for a bare model), ``depth``
        (position in block order within the component: the block index ``N`` of ``layers.N`` for LLMs and text
        encoders, the place in the U for UNets; see :mod:`adaptkit.depth`), ``rank`` (nominal), ``scale``, ``dora``, ``fro_norm``
        (``||dW||_F``), ``spectral_norm``, ``stable_rank``, ``effective_rank`` (``exp`` of the entropy of
        ``s_i / sum s``; see :func:`spectrum_stats`), ``rank_90`` / ``rank_99`` (directions holding 90% / 99%
        of ``||dW||_F^2``), ``energy_share`` (``||dW||_F^2`` over the adapter's total), ``sparsity`` (fraction of
        exactly-zero entries of ``dW``, see :func:`layer_sparsity`), ``finite``, ``method`` (``lowrank``,
        ``kron``, ``dense``) and ``note`` (IA3 vector statistics, DoRA, non-finite). IA3 rows have NaN
        ``dW`` statistics.

    Example:
        >>> import adaptkit as ak
        >>> ak.analyze("path/to/adapter").sort_values("energy_share", ascending=False).head()
    """
    return analyze_adapter(adapter_or_source, format=format, base=base, experts=experts).table


def natural_key(path: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


__all__ = [
    "COLUMNS",
    "AdapterAnalysis",
    "SpectrumStats",
    "adapter_name",
    "analyze",
    "analyze_adapter",
    "analyze_layer",
    "energy_rank",
    "layer_sparsity",
    "layer_spectrum",
    "module_depth",
    "spectrum_stats",
]
