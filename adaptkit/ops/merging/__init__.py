"""Merging adapters: PEFT's eleven ``combination_type``s with PEFT's numbers, exact ``task_arithmetic``, mergekit's
breadcrumbs / DELLA and the LoRA-native KnOTS, TSV-M, Iso-C/CTS and core-space methods.

* :mod:`.catalog`: the one table of methods, each built from parts (imports no torch: ``merge --help`` reads it).
* :mod:`.primitives`: pruning, majority sign, disjoint mean (element-wise parts); :mod:`.methods`: their combination.
* :mod:`.subspace`: the methods that align factors in shared bases (KnOTS, TSV-M, Iso-C/CTS, core space).
* :mod:`.lowrank`: exact truncated SVDs that stay low rank.
* :mod:`.driver`: :func:`merge` (adapters in, adapter out) and :func:`merge_to` (sources in, files out).

The names below load lazily, so that importing :mod:`.catalog` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"PROVENANCE_KEY": "driver", "merge": "driver", "merge_to": "driver", "METHODS": "catalog",
         "PEFT_METHODS": "catalog", "Method": "catalog", "get_method": "catalog"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "PEFT_METHODS", "PROVENANCE_KEY", "Method", "get_method", "merge", "merge_to"]
