"""Status tables: a static per-layer table for checkpoints (this file's first half).

For a checkpoint (an :class:`~adaptkit.graph.Adapter` or a source) every row describes one layer: kind,
shapes, rank, alpha, scale, dtype, ``||dW||_F`` and whether its tensors are finite. ``||dW||_F`` of a
LoRA layer is computed from the ``r x r`` Gram matrices of its factors, never from the dense ``m x n``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from .graph import Adapter
from .kinds import LoRA, layer_dtype, layer_is_finite, layer_nbytes, tensor_fields


@dataclass(frozen=True)
class CheckpointLayerRow:
    """One row of :func:`checkpoint_status`."""

    module: str
    kind: str
    shape: str
    tensors: str
    rank: int | None
    alpha: float | None
    scale: float
    dtype: str
    delta_norm: float
    dora: bool
    finite: bool


def delta_fro_norm(layer: Any) -> float:
    """``||dW||_F`` of a layer; low-rank (Gram matrices) for LoRA, dense for LoHa/LoKr/Full, NaN for IA3."""
    if layer.kind == "ia3":
        return math.nan
    if isinstance(layer, LoRA):
        u, v = layer.factors()
        gram = (u.T @ u) * (v @ v.T)
        return float(gram.sum().clamp_min(0).sqrt())
    return float(torch.linalg.vector_norm(layer.delta()))


def _shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape) if shape is not None else "?"


def checkpoint_rows(adapter: Adapter) -> list[CheckpointLayerRow]:
    """Per-layer rows for an adapter, sorted by module path."""
    rows = []
    for path in sorted(adapter.layers):
        layer = adapter.layers[path]
        tensors = ", ".join(f"{k}:{_shape_text(t.shape)}" for k, t in tensor_fields(layer).items())
        rows.append(CheckpointLayerRow(
            module=path,
            kind=layer.kind,
            shape=_shape_text(layer.shape),
            tensors=tensors,
            rank=layer.rank,
            alpha=None if layer.alpha is None else float(layer.alpha),
            scale=float(layer.scale),
            dtype=str(layer_dtype(layer)).replace("torch.", ""),
            delta_norm=delta_fro_norm(layer),
            dora=getattr(layer, "magnitude", None) is not None,
            finite=layer_is_finite(layer),
        ))
    return rows


def checkpoint_status(adapter: Adapter) -> pd.DataFrame:
    """The static per-layer table of a checkpoint as a DataFrame (one row per layer).

    Columns: module, kind, shape, tensors, rank, alpha, scale, dtype, delta_norm (``||dW||_F``; NaN for
    IA3, which has no base-free delta), dora, finite.
    """
    rows = checkpoint_rows(adapter)
    columns = list(CheckpointLayerRow.__dataclass_fields__)
    return pd.DataFrame([asdict(r) for r in rows], columns=columns)


def _distribution(values: list[Any]) -> dict[str, int]:
    return {str(k): n for k, n in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def checkpoint_summary(adapter: Adapter) -> dict[str, Any]:
    """Headline facts of a checkpoint: format, kinds, base model, layer count, rank/alpha distribution, dtype, size."""
    layers = list(adapter.layers.values())
    return {
        "source": adapter.source,
        "format": adapter.format,
        "kinds": adapter.kind_counts(),
        "base_model": adapter.base_model,
        "num_layers": len(layers),
        "ranks": _distribution([layer.rank for layer in layers if layer.rank is not None]),
        "alphas": _distribution([float(layer.alpha) for layer in layers if layer.alpha is not None]),
        "dtype": str(adapter.dtype).replace("torch.", "") if adapter.dtype else None,
        "parameters": adapter.numel,
        "bytes": sum(layer_nbytes(layer) for layer in layers),
        "extras": len(adapter.extras),
        "finite": adapter.is_finite(),
    }
