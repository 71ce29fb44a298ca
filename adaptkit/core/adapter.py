"""The canonical adapter graph: layers keyed by module path, plus everything else a checkpoint carries.

Every format reader produces an :class:`Adapter` and every writer consumes one, so merging, conversion,
fusing and analysis never see a file format. Module paths are dotted paths in the base model's own
namespace (``model.layers.0.self_attn.q_proj``); multi-component pipelines keep the component as the
first part of the path (``unet.down_blocks.0...``, ``text_encoder.text_model...``).
"""

from __future__ import annotations

import dataclasses
import html
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import NonFiniteError
from .kinds import (
    Layer,
    cast_layer,
    layer_dtype,
    tensor_fields,
)
from .kinds.base import nonfinite_fields, tensor_is_finite

#: layers shown in a notebook's table; the rest are counted (an SDXL LoRA has ~800, a full LLM one thousands)
HTML_MAX_LAYERS = 50


@dataclass(frozen=True, eq=False)
class Adapter:
    """An adapter checkpoint in canonical form.

    Args:
        layers: module path -> layer (one of the kinds in :mod:`adaptkit.kinds`).
        base_model: the base model's id or path when the checkpoint names it.
        metadata: safetensors header metadata (``ss_*``, ``modelspec.*``, ``format`` ...), kept verbatim.
        config: the source format's config fields (e.g. the whole ``adapter_config.json``); writers keep
            the fields they do not interpret.
        extras: tensors that are not adapter layers (``modules_to_save`` weights, saved embedding
            weights, unknown keys), keyed by their name without the format's prefix, carried through.
        format: the format it was read from (``"peft"``, ``"kohya"``, ``"diffusers"``) or ``None``.
        source: where it was read from (hub id with revision, or a path), for provenance.
        name: the adapter name (PEFT's adapter name; ``"default"`` by default).
    """

    layers: Mapping[str, Layer]
    base_model: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    format: str | None = None
    source: str | None = None
    name: str = "default"

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, path: str) -> Layer:
        return self.layers[path]

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.kind_counts().items()))
        return f"Adapter({len(self.layers)} layers: {kinds}; base={self.base_model!r}; format={self.format!r})"

    def _repr_html_(self) -> str:
        """What a notebook displays: a summary and the first :data:`HTML_MAX_LAYERS` layers as a table."""
        return adapter_html(self)

    def replace(self, **changes: Any) -> Adapter:
        """Return a copy with some fields replaced (``layers=...``, ``metadata=...``)."""
        return dataclasses.replace(self, **changes)

    def kind_counts(self) -> dict[str, int]:
        """Number of layers per kind name (``{"lora": 64}``)."""
        return dict(Counter(layer.kind for layer in self.layers.values()))

    def dora_layers(self) -> list[str]:
        """Paths of the layers with a DoRA magnitude vector (sorted; empty for a non-DoRA adapter)."""
        return sorted(p for p, layer in self.layers.items() if layer.dora)

    @property
    def kinds(self) -> set[str]:
        """The set of kind names present."""
        return {layer.kind for layer in self.layers.values()}

    @property
    def dtype(self) -> torch.dtype | None:
        """The most common storage dtype of the layers (``None`` for an empty adapter)."""
        if not self.layers:
            return None
        return Counter(layer_dtype(layer) for layer in self.layers.values()).most_common(1)[0][0]

    def _stored_tensors(self) -> list[torch.Tensor]:
        """The layers' tensors, each once: a tensor several layers share (VeRA's projections) is stored once."""
        seen: dict[int, torch.Tensor] = {}
        for layer in self.layers.values():
            for t in tensor_fields(layer).values():
                seen.setdefault(id(t), t)
        return list(seen.values())

    @property
    def numel(self) -> int:
        """Number of stored adapter parameters (extras excluded; a tensor layers share counts once)."""
        return sum(t.numel() for t in self._stored_tensors())

    @property
    def layers_nbytes(self) -> int:
        """Bytes of the layers' tensors (a tensor layers share counts once), extras excluded."""
        return sum(t.numel() * t.element_size() for t in self._stored_tensors())

    @property
    def nbytes(self) -> int:
        """Bytes of adapter tensors plus extras."""
        return self.layers_nbytes + sum(t.numel() * t.element_size() for t in self.extras.values())

    def nonfinite(self) -> dict[str, list[str]]:
        """Where the adapter holds NaN or Inf: ``{layer path: [fields]}`` (tensors, ``alpha``, ``scale``) and
        ``{extra tensor name: ["value"]}``; empty when everything is finite.

        The rule per layer is :func:`adaptkit.kinds.base.nonfinite_fields`: scales and alphas count as much as
        the factor tensors (a NaN ``lora_alpha`` makes every layer it applies to non-finite).
        """
        bad = {path: fields for path, layer in self.layers.items() if (fields := nonfinite_fields(layer))}
        for key, t in self.extras.items():
            if not tensor_is_finite(t):
                bad[key] = ["value"]
        return bad

    def is_finite(self) -> bool:
        """True when no layer tensor, alpha, scale or extra tensor holds NaN or Inf (see :meth:`nonfinite`)."""
        return not self.nonfinite()

    def check_finite(self, purpose: str) -> None:
        """Refuse a non-finite adapter before ``purpose`` uses it.

        Args:
            purpose: what needs finite values, for the message (``"inject"``, ``"fuse"``, ``"merge"`` ...).

        Raises:
            NonFiniteError: naming the first non-finite layer, its fields and how many there are.
        """
        bad = self.nonfinite()
        if not bad:
            return
        path = sorted(bad)[0]
        fields = bad[path]
        where = f"extra tensor {path}" if path not in self.layers else f"{path} ({', '.join(fields)})"
        hint = (" (alpha comes from lora_alpha/alpha/alpha_pattern in adapter_config.json or the file's alpha tensor)"
                if any(f in ("alpha", "scale") for f in fields) else "")
        label = f"adapter {self.source}" if self.source else "the adapter"
        raise NonFiniteError(
            f"{label} holds NaN or Inf in {where}{hint}; {len(bad)} of {len(self.layers) + len(self.extras)} "
            f"layers/tensors are not finite, and {purpose} needs finite values: fix or re-save the checkpoint"
        )

    def to(self, dtype: torch.dtype) -> Adapter:
        """A copy with every floating tensor of every layer cast to ``dtype`` (extras unchanged)."""
        return self.replace(layers={k: cast_layer(v, dtype) for k, v in self.layers.items()})


def _size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape) if shape is not None else "?"


def adapter_html(adapter: Adapter, max_layers: int = HTML_MAX_LAYERS) -> str:
    """An adapter as HTML: summary lines and a per-layer table (kind, shapes, rank, alpha, scale, dtype).

    Args:
        adapter: the adapter.
        max_layers: table rows at most; a last row counts the layers left out.

    Returns:
        An HTML fragment; every value from the checkpoint is escaped. Nothing is computed from tensor
        values (no norms), so it is instant for any adapter.
    """
    esc = html.escape
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(adapter.kind_counts().items())) or "none"
    dtype = str(adapter.dtype).removeprefix("torch.") if adapter.dtype is not None else "-"
    summary = [("layers", f"{len(adapter.layers)} ({kinds})"), ("format", adapter.format or "-"),
               ("base model", adapter.base_model or "-"), ("source", adapter.source or "-"), ("dtype", dtype),
               ("parameters", f"{adapter.numel:,}"), ("size", _size_text(adapter.nbytes)),
               ("extras", str(len(adapter.extras)))]
    head = "".join(f"<tr><th style=\"text-align:left\">{esc(k)}</th><td style=\"text-align:left\">{esc(v)}</td></tr>"
                   for k, v in summary)
    cols = ("module", "kind", "shape", "rank", "alpha", "scale", "dtype", "tensors")
    rows = []
    for path, layer in list(adapter.layers.items())[:max_layers]:
        kind = layer.kind + (" (dora)" if layer.dora else "")
        tensors = ", ".join(f"{k} {_shape_text(t.shape)}" for k, t in tensor_fields(layer).items())
        values = (path, kind, _shape_text(layer.shape), "-" if layer.rank is None else str(layer.rank),
                  "-" if layer.alpha is None else f"{float(layer.alpha):g}", f"{float(layer.scale):g}",
                  str(layer_dtype(layer)).removeprefix("torch."), tensors)
        rows.append("<tr>" + "".join(f"<td style=\"text-align:left\">{esc(v)}</td>" for v in values) + "</tr>")
    hidden = len(adapter.layers) - len(rows)
    if hidden > 0:
        rows.append(f"<tr><td colspan=\"{len(cols)}\" style=\"text-align:left\"><i>... {hidden} more layer"
                    f"{'s' * (hidden != 1)} (all are in <code>.layers</code>)</i></td></tr>")
    header = "<tr>" + "".join(f"<th style=\"text-align:left\">{c}</th>" for c in cols) + "</tr>"
    return (f"<div><b>{esc(type(adapter).__name__)}</b><table>{head}</table>"
            f"<div style=\"max-height:480px;overflow:auto\"><table>{header}{''.join(rows)}</table></div></div>")
