"""Self-contained HTML reports of :mod:`adaptkit.analysis` and :mod:`adaptkit.comparison` results.

One HTML file, no external resources: plots are PNGs embedded as base64 ``data:`` URIs, tables are plain
HTML. Plots need matplotlib (the optional extra: ``pip install 'adaptkit[plot]'``); it is used through its
object API (``matplotlib.figure.Figure``), so no pyplot state or GUI backend is touched.

* analysis: per-layer energy and effective rank by depth (one row of plots per pipeline component, a UNet's
  axis labelled by block), singular-value spectra and cumulative energy, the per-layer table.
* comparison: cosine and sign-conflict heat maps between adapters, per-module cosine by component and depth
  for each pair, each adapter's energy by depth (one panel per component), the pair and layer tables and the
  merge suggestion.

Depths and components come from :mod:`adaptkit.depth`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import ConfigError, UnsupportedError
from ..io.outputs import atomic_output, check_output
from .depth import block_ticks, component_rank, module_positions
from .results import AdapterAnalysis, Comparison

MISSING = "the HTML report needs matplotlib, which is not installed; run: pip install 'adaptkit[plot]'"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} img{max-width:100%;border:1px solid #eee;margin:6px 0}
table{border-collapse:collapse;font-size:12px;margin:8px 0} th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:right} th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px} dt{font-weight:600} dd{margin:0}
.wide{overflow:auto;max-height:85vh;border:1px solid #eee} .wide table{margin:0}
.wide th{position:sticky;top:0;z-index:1} .wide td:first-child{overflow-wrap:anywhere;min-width:14em;max-width:32em}
.wide td{vertical-align:top} .suggest{background:#eef6ee;border-left:4px solid #4a4;padding:8px 12px} .notes{color:#555;font-size:13px}
"""


def require_matplotlib() -> None:
    """Raise :class:`~adaptkit.errors.UnsupportedError` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UnsupportedError(MISSING) from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> str:
    """The figure as an ``<img>`` tag with a base64 PNG ``data:`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _module_type(path: str) -> str:
    """The module's type name: its last component, with the name before trailing indices (``to_out.0``)."""
    parts = path.split(".")
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return ".".join(parts[i:])


# ------------------------------------------------------------------------------------ plots


def _components(table: pd.DataFrame) -> list[str]:
    """The table's pipeline components in display order (the denoiser first, then the text encoders)."""
    comps = table["component"].unique() if "component" in table else [""]
    return sorted((str(c) for c in comps), key=component_rank)


def _ticks(table: pd.DataFrame, modules: Any = None) -> dict[int, str]:
    """UNet block labels by integer depth of ``modules`` (default: all), placed among all the table's modules."""
    positions = module_positions(list(table["module"]))
    return block_ticks(positions[m] for m in (table["module"] if modules is None else modules))


def _depth_axis(ax: Any, ticks: dict[int, str]) -> str:
    """Integer ticks, or a UNet's block names; returns the x label."""
    from matplotlib.ticker import MaxNLocator

    if ticks:
        ax.set_xticks(list(ticks), list(ticks.values()), rotation=30, ha="right", fontsize=8)
        return "UNet block"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return "depth (block index)"


def _prefix(component: str, several: bool) -> str:
    return f"{component or 'model'}: " if several else ""


def plot_depth_profile(analysis: AdapterAnalysis) -> str:
    """Energy share and effective rank of each module type against depth, one row per component (``<img>`` tag)."""
    t = analysis.table[analysis.table["fro_norm"].notna()].copy()
    components = _components(t)
    several = len(components) > 1
    fig = _figure(11, 3.6 * len(components))
    for (ax_e, ax_r), comp in zip(fig.subplots(len(components), 2, squeeze=False), components):
        c = t[t["component"] == comp].copy()
        has_depth = c["depth"].notna().any()
        if not has_depth:  # no block index in the paths: plot by row order instead
            c["depth"] = range(len(c))
        ticks = _ticks(analysis.table, c["module"]) if has_depth else {}
        if ticks:  # a UNet: one point per block (its layers summed / averaged), fractional depths would zig-zag
            c["depth"] = c["depth"].map(lambda d: float(d) // 1 if _known(d) else d)
        c["type"] = c["module"].map(_module_type)
        colours = _colours(c["type"].nunique())
        for colour, (name, g) in zip(colours, c.groupby("type", sort=True)):
            # several modules of one type in one block (attn1/attn2, transformer blocks, UNet layers): sum / mean
            g = g.groupby(g["depth"].astype(float)).agg(energy=("energy_share", "sum"), erank=("effective_rank", "mean"))
            ax_e.plot(g.index, g["energy"] * 100, marker="o", markersize=4, color=colour, label=name)
            ax_r.plot(g.index, g["erank"], marker="o", markersize=4, color=colour, label=name)
        ranks = c["rank"].dropna()
        if len(ranks):
            ax_r.axhline(float(ranks.max()), color="#999", linestyle="--", linewidth=1, label="nominal rank")
        xlabel = "layer (order)"
        for ax in (ax_e, ax_r):
            ax.grid(alpha=0.3)
            if has_depth:
                xlabel = _depth_axis(ax, ticks)
            else:
                ax.xaxis.set_major_locator(_integer_locator())
        pre = _prefix(comp, several)
        ax_e.set(title=f"{pre}energy per block and module type (sum)", xlabel=xlabel, ylabel="% of adapter ||dW||_F^2")
        ax_r.set(title=f"{pre}effective rank per block and module type (mean)", xlabel=xlabel, ylabel="effective rank")
        if several:  # the component's name makes the titles longer
            ax_e.title.set_fontsize(10)
            ax_r.title.set_fontsize(10)
        _, labels = ax_r.get_legend_handles_labels()
        if len(labels) <= 12:
            ax_r.legend(fontsize=8)
        elif len(labels) <= 40:  # beside the plot, where it hides no line
            ax_r.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + len(labels) // 21)
    return _png(fig)


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _colours(n: int) -> list[Any]:
    """``n`` distinguishable line colours (matplotlib's default cycle, tab20 beyond ten)."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def plot_spectra(analysis: AdapterAnalysis, max_lines: int = 200) -> str:
    """Singular values of every layer (log scale) and their cumulative energy, coloured by depth.

    With several components the colour is the depth within the layer's own component (0 = first block).
    """
    from matplotlib import colormaps

    items = list(analysis.spectra.items())
    if len(items) > max_lines:  # keep an even spread of layers
        keep = np.linspace(0, len(items) - 1, max_lines).round().astype(int)
        items = [items[i] for i in sorted(set(keep))]
    table = analysis.table.set_index("module")
    depths = table["depth"].to_dict()
    comps = table["component"].to_dict()
    spans: dict[str, tuple[float, float]] = {}  # component -> (lowest depth, span)
    for comp in set(comps.values()):
        known = [float(d) for m, d in depths.items() if comps[m] == comp and _known(d)]
        if known:
            lo = min(0.0, min(known))
            spans[comp] = (lo, max(max(known) - lo, 1.0))
    several = len(set(comps.values())) > 1
    cmap = colormaps["viridis"]
    fig = _figure(11, 3.6)
    ax_s, ax_c = fig.subplots(1, 2)
    for path, s in items:
        d, span = depths.get(path), spans.get(comps.get(path))
        color = cmap(0.5 if not _known(d) or span is None else (float(d) - span[0]) / span[1])
        s = np.asarray(s)
        x = np.arange(1, s.size + 1)
        positive = s > max(s.max(), 1e-300) * 1e-7 if s.size else s
        ax_s.semilogy(x[positive], s[positive], color=color, alpha=0.7, linewidth=1)
        energy = s**2
        if energy.sum() > 0:
            ax_c.plot(x, np.cumsum(energy) / energy.sum() * 100, color=color, alpha=0.7, linewidth=1)
    for level in (90, 99):
        ax_c.axhline(level, color="#c33", linestyle=":", linewidth=1)
    ax_s.set(title="singular values of dW per layer (colour = depth)", xlabel="index i", ylabel="s_i")
    ax_c.set(title="cumulative energy (dotted: 90% / 99%)", xlabel="number of directions k",
             ylabel="% of ||dW||_F^2")
    for ax in (ax_s, ax_c):
        ax.grid(alpha=0.3)
    if spans:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        if several:
            fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=ax_c, label="depth in component (0 = first block)")
        else:
            lo, span = next(iter(spans.values()))
            bar = fig.colorbar(ScalarMappable(Normalize(lo, lo + span), cmap), ax=ax_c, label="depth")
            ticks = _ticks(analysis.table)
            if ticks:
                bar.set_ticks(list(ticks), labels=list(ticks.values()))
                bar.set_label("UNet block")
    return _png(fig)


def _known(d: Any) -> bool:
    return d is not None and not (isinstance(d, float) and math.isnan(d))


def _heat(ax: Any, matrix: np.ndarray, labels_y: Sequence[str], labels_x: Sequence[str], title: str,
          vmin: float, vmax: float, cmap: str, fmt: str) -> Any:
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    ax.set_title(title)
    if matrix.size <= 400:
        for (r, c), v in np.ndenumerate(matrix):
            if not math.isnan(v):
                red, green, blue, _ = im.cmap(im.norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # white text on dark cells
                ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return im


def plot_pair_heatmaps(comparison: Comparison) -> str:
    """Adapter x adapter heat maps of pooled cosine similarity and sign-conflict rate."""
    names = list(comparison.names)
    n = len(names)
    cos = np.full((n, n), np.nan)
    conf = np.full((n, n), np.nan)
    np.fill_diagonal(cos, 1.0)
    np.fill_diagonal(conf, 0.0)
    for _, p in comparison.pairs.iterrows():
        i, j = names.index(p["a"]), names.index(p["b"])
        cos[i, j] = cos[j, i] = p["cosine"]
        conf[i, j] = conf[j, i] = p["sign_conflict"]
    fig = _figure(11, 0.6 * n + 3)
    ax_a, ax_b = fig.subplots(1, 2)
    im = _heat(ax_a, cos, names, names, "cosine similarity of dW (all shared layers)", -1, 1, "RdBu_r", ".2f")
    fig.colorbar(im, ax=ax_a)
    im = _heat(ax_b, conf, names, names, f"sign conflict, top {comparison.density:.0%} entries", 0, 1,
               "magma_r", ".0%")
    fig.colorbar(im, ax=ax_b)
    return _png(fig)


def plot_layer_heatmap(comparison: Comparison, a: str, b: str) -> str | None:
    """Module type x depth heat map of per-layer cosine similarity for one pair (``None`` when empty).

    Columns are depths per component (UNet blocks by name); modules without a depth go to column ``-1``.
    """
    rows = comparison.layers[(comparison.layers["a"] == a) & (comparison.layers["b"] == b)].copy()
    if rows.empty:
        return None
    positions = module_positions(list(rows["module"]))
    several = len({p.component for p in positions.values()}) > 1
    columns: dict[tuple[Any, ...], str] = {}

    def column(path: str) -> tuple[Any, ...]:
        p = positions[path]
        depth = int(p.depth // 1) if _known(p.depth) else -1
        key = (component_rank(p.component), depth)
        label = p.block if p.block is not None else str(depth)
        columns[key] = f"{_SHORT.get(p.component, p.component or 'model')} {label}" if several else label
        return key

    rows["type"] = rows["module"].map(_module_type)
    rows["column"] = rows["module"].map(column)
    grid = rows.pivot_table(index="type", columns="column", values="cosine", aggfunc="mean")
    grid = grid[sorted(grid.columns)]
    fig = _figure(11, 0.45 * len(grid.index) + 2.2)
    ax = fig.subplots(1, 1)
    title = f"per-layer cosine similarity: {a} vs {b} (columns = {'component and ' if several else ''}depth)"
    im = _heat(ax, grid.to_numpy(dtype=float), [str(i) for i in grid.index], [columns[c] for c in grid.columns],
               title, -1, 1, "RdBu_r", ".2f")
    fig.colorbar(im, ax=ax)
    return _png(fig)


#: short component names for crowded axis labels
_SHORT = {"text_encoder": "te", "text_encoder_2": "te2", "text_encoder_3": "te3", "transformer": "dit"}


def plot_energy_overlay(analyses: Sequence[AdapterAnalysis]) -> str:
    """Total ``||dW||_F^2`` per block for several adapters, one panel per component."""
    tables = [(an, an.table[an.table["fro_norm"].notna() & an.table["depth"].notna()]) for an in analyses]
    components = sorted({str(c) for _, t in tables for c in t["component"]}, key=component_rank) or [""]
    several = len(components) > 1
    fig = _figure(11, 3.4 * len(components))
    for ax, comp in zip(fig.subplots(len(components), 1, squeeze=False)[:, 0], components):
        ticks: dict[int, str] = {}
        for an, t in tables:
            t = t[t["component"] == comp]
            if t.empty:
                continue
            ticks.update(_ticks(an.table, t["module"]))
            blocks = t["depth"].map(lambda d: int(float(d) // 1))  # UNet layers inside a block: summed
            energy = (t["fro_norm"] ** 2).groupby(blocks).sum()
            ax.plot(energy.index, energy.to_numpy(), marker="o", label=an.name)
        xlabel = _depth_axis(ax, dict(sorted(ticks.items())))
        ax.set(title=f"{_prefix(comp, several)}energy ||dW||_F^2 per block, by adapter", xlabel=xlabel,
               ylabel="||dW||_F^2")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------ HTML


def _table(df: pd.DataFrame) -> str:
    def fmt(x: Any) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

    return '<div class="wide">' + df.to_html(index=False, border=0, float_format=fmt, na_rep="", escape=True) + "</div>"


def _page(title: str, subtitle: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p class=\"sub\">{html.escape(subtitle)} &middot; adaptkit {__version__}</p>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _dl(items: dict[str, Any]) -> str:
    parts = []
    for k, v in items.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>")
    return "<dl>" + "".join(parts) + "</dl>"


_DEFINITIONS = (
    "<p class=\"notes\">Statistics of dW in the math orientation (out x in&middot;kernel). "
    "stable rank = ||dW||_F&sup2; / ||dW||_2&sup2;; effective rank = exp(H(p)), p_i = s_i / &sum; s_j; "
    "rank_90 / rank_99 = directions holding 90% / 99% of ||dW||_F&sup2;; energy share = ||dW||_F&sup2; over the "
    "adapter's total; sparsity = fraction of exactly-zero entries of dW. method: lowrank = QR of the factors and "
    "SVD of the small core (dW never built), kron = product of the Kronecker factors' singular values, "
    "dense = SVD of dW.</p>")


def analysis_html(analysis: AdapterAnalysis) -> str:
    """The analysis report as an HTML string."""
    body = ["<h2>Summary</h2>", _dl(analysis.summary())]
    if analysis.spectra:
        body += ["<h2>Energy and effective rank by depth</h2>", plot_depth_profile(analysis),
                 "<h2>Singular-value spectra</h2>", plot_spectra(analysis)]
    else:
        body.append("<p class=\"notes\">No layer has a base-free dW (IA3 or non-finite only): no plots.</p>")
    body += ["<h2>Layers</h2>", _DEFINITIONS, _table(analysis.table)]
    return _page(f"adaptkit analysis: {analysis.name}", str(analysis.source or ""), body)


def compare_html(comparison: Comparison, analyses: Sequence[AdapterAnalysis] = ()) -> str:
    """The comparison report as an HTML string."""
    body = ["<h2>Suggested merge</h2>",
            f"<p class=\"suggest\"><b>{html.escape(comparison.method)}</b>: {html.escape(comparison.reason)}</p>",
            "<h2>Similarity between adapters</h2>", plot_pair_heatmaps(comparison)]
    for _, p in comparison.pairs.head(6).iterrows():
        img = plot_layer_heatmap(comparison, p["a"], p["b"])
        if img:
            body.append(img)
    if analyses:
        body += ["<h2>Energy by depth</h2>", plot_energy_overlay(analyses)]
    body += ["<h2>Pairs</h2>",
             ("<p class=\"notes\">target_jaccard = shared modules / modules either adapter changes; cosine pooled over "
              "shared layers; sign_conflict = share of positions in both adapters' top-k (k = density &middot; entries) "
              "with opposite signs (0.5 = unrelated).</p>"),
             _table(comparison.pairs), "<h2>Layers</h2>", _table(comparison.layers)]
    return _page("adaptkit comparison: " + ", ".join(comparison.names), f"density {comparison.density:g}", body)


def _write(text: str, path: str | os.PathLike, inputs: Sequence[str | None]) -> Path:
    out = Path(path).expanduser()
    check_output(out, overwrite=True, inputs=inputs)  # a report replaces an earlier one, never an input
    if out.is_dir():
        raise ConfigError(f"report path {out} is a directory; give a file name such as report.html")
    with atomic_output(out, overwrite=True, directory=False) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be shared
    return out


def write_analysis_report(analysis: AdapterAnalysis, path: str | os.PathLike) -> Path:
    """Write the analysis report (self-contained HTML) to ``path``, replacing it; returns the path.

    Raises:
        UnsupportedError: matplotlib is missing.
    """
    require_matplotlib()
    return _write(analysis_html(analysis), path, [analysis.source])


def write_compare_report(comparison: Comparison, analyses: Sequence[AdapterAnalysis], path: str | os.PathLike) -> Path:
    """Write the comparison report (self-contained HTML) to ``path``, replacing it; returns the path.

    Raises:
        UnsupportedError: matplotlib is missing.
    """
    require_matplotlib()
    return _write(compare_html(comparison, analyses), path, [a.source for a in analyses])


__all__ = [
    "MISSING",
    "analysis_html",
    "compare_html",
    "plot_depth_profile",
    "plot_energy_overlay",
    "plot_layer_heatmap",
    "plot_pair_heatmaps",
    "plot_spectra",
    "require_matplotlib",
    "write_analysis_report",
    "write_compare_report",
]
