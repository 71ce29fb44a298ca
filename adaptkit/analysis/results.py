"""What analysis and comparison return: plain results, computed by :mod:`.layers` and :mod:`.compare`.

The HTML report (:mod:`.report`) and the CLI only consume these; nothing here computes or writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class AdapterAnalysis:
    """The result of :func:`~adaptkit.analysis.layers.analyze_adapter`.

    Args:
        name: a short name for the adapter (used in reports and comparisons).
        table: the per-layer DataFrame (:data:`COLUMNS`).
        spectra: module path -> singular values (descending, float64); IA3 and non-finite layers absent.
        source: where the adapter came from, when known.
    """

    name: str
    table: pd.DataFrame
    spectra: Mapping[str, np.ndarray] = field(default_factory=dict)
    source: str | None = None

    def summary(self) -> dict[str, Any]:
        """A few adapter-level figures: layers, kinds, total ``||dW||_F``, median effective rank, top layer."""
        t = self.table
        with_delta = t[t["fro_norm"].notna()]
        top = with_delta.sort_values("energy_share", ascending=False).head(1)
        return {
            "adapter": self.name,
            "source": self.source,
            "layers": len(t),
            "kinds": {str(k): int(v) for k, v in t["kind"].value_counts().sort_index().items()},
            "total_fro_norm": float(np.sqrt((with_delta["fro_norm"] ** 2).sum())) if len(with_delta) else math.nan,
            "median_effective_rank": float(with_delta["effective_rank"].median()) if len(with_delta) else math.nan,
            "top_layer": None if top.empty else f"{top['module'].iloc[0]} ({top['energy_share'].iloc[0]:.1%})",
            "all_finite": bool(t["finite"].all()),
        }


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`~adaptkit.analysis.compare.compare_adapters`.

    Args:
        names: adapter display names, in input order.
        layers: per shared module and pair (:data:`~adaptkit.analysis.compare.LAYER_COLUMNS`).
        pairs: per pair summary (:data:`~adaptkit.analysis.compare.PAIR_COLUMNS`): target overlap, pooled cosine and conflict, suggestion.
        method: the suggested merge method for all adapters together.
        reason: why (one sentence with the figures).
        density: the TIES density used for the sign statistics.
    """

    names: tuple[str, ...]
    layers: pd.DataFrame
    pairs: pd.DataFrame
    method: str
    reason: str
    density: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``): adapters, density, suggestion, pairs, layers."""
        return write_json_safe({
            "adapters": list(self.names),
            "density": self.density,
            "suggestion": {"method": self.method, "reason": self.reason},
            "pairs": self.pairs.to_dict(orient="records"),
            "layers": self.layers.to_dict(orient="records"),
        })


def write_json_safe(value: Any) -> Any:
    """Turn NaN floats into ``None`` and numpy scalars into Python ones, recursively (for JSON output)."""
    if isinstance(value, dict):
        return {k: write_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [write_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["AdapterAnalysis", "Comparison", "write_json_safe"]
