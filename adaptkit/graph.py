"""The canonical adapter graph: layers keyed by module path, plus everything else a checkpoint carries.

Every format reader produces an :class:`Adapter` and every writer consumes one, so merging, conversion,
fusing and analysis never see a file format. Module paths are dotted paths in the base model's own
namespace (``model.layers.0.self_attn.q_proj``); multi-component pipelines keep the component as the
first part of the path (``unet.down_blocks.0...``, ``text_encoder.text_model...``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NonFiniteError
from .kinds import Layer, cast_layer, layer_dtype, layer_nbytes, layer_numel
from .kinds.base import nonfinite_fields


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

    def replace(self, **changes: Any) -> Adapter:
        """Return a copy with some fields replaced (``layers=...``, ``metadata=...``)."""
        return dataclasses.replace(self, **changes)

    def kind_counts(self) -> dict[str, int]:
        """Number of layers per kind name (``{"lora": 64}``)."""
        return dict(Counter(layer.kind for layer in self.layers.values()))

    def dora_layers(self) -> list[str]:
        """Paths of the layers with a DoRA magnitude vector (sorted; empty for a non-DoRA adapter)."""
        return sorted(p for p, layer in self.layers.items() if getattr(layer, "magnitude", None) is not None)

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

    @property
    def numel(self) -> int:
        """Number of stored adapter parameters (extras excluded)."""
        return sum(layer_numel(layer) for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        """Bytes of adapter tensors plus extras."""
        return sum(layer_nbytes(layer) for layer in self.layers.values()) + sum(
            t.numel() * t.element_size() for t in self.extras.values()
        )

    def nonfinite(self) -> dict[str, list[str]]:
        """Where the adapter holds NaN or Inf: ``{layer path: [fields]}`` (tensors, ``alpha``, ``scale``) and
        ``{extra tensor name: ["value"]}``; empty when everything is finite.

        The rule per layer is :func:`adaptkit.kinds.base.nonfinite_fields`: scales and alphas count as much as
        the factor tensors (a NaN ``lora_alpha`` makes every layer it applies to non-finite).
        """
        bad = {path: fields for path, layer in self.layers.items() if (fields := nonfinite_fields(layer))}
        for key, t in self.extras.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
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
