"""Coverage certificates, in one import: the certificate itself (:mod:`adaptkit.core.coverage`) and its
computation against a base model's tensor names and shapes (:mod:`adaptkit.formats.coverage`)."""

from __future__ import annotations

import os
from typing import Any

from ..core.coverage import (
    METADATA_KEY,
    STATUSES,
    Certificate,
    CoverageError,
    LayerCoverage,
    Outcome,
    all_matched,
    certify,
    layer_energy,
)
from ..formats.coverage import base_tensors, certify_base, extra_module, match_layers
from ..formats.inputs import as_adapter

__all__ = ["METADATA_KEY", "STATUSES", "Certificate", "CoverageError", "LayerCoverage", "Outcome", "all_matched",
           "base_tensors", "certify", "certify_base", "coverage", "extra_module", "layer_energy", "match_layers"]


def coverage(adapter: Any, base: Any, *, drop: list[str] | tuple[str, ...] | None = None) -> Certificate:
    """The coverage certificate of an adapter (a path or :class:`~adaptkit.Adapter`) against a base model.

    Args:
        adapter: hub id, directory, file or Adapter.
        base: hub id, directory, ``.safetensors`` file, shipped inventory name, ``nn.Module`` or
            ``{tensor key: shape}``; only headers/configs are read.
        drop: when given, partial coverage raises :class:`CoverageError` unless these globs name what is lost.

    Returns:
        A :class:`Certificate`: ``cert.energy_share``, ``cert.missing``, ``cert.to_frame()``.
    """
    ad = as_adapter(adapter, against=base if isinstance(base, (str, os.PathLike)) else None)
    return certify_base(ad, base, operation="check", drop=drop)
