"""Merging adapters: PEFT's eleven ``combination_type``s with PEFT's numbers, plus exact ``task_arithmetic``.

* :mod:`.primitives`: pruning, majority sign, disjoint mean (element-wise parts).
* :mod:`.methods`: the one table of methods, each built from parts.
* :mod:`.lowrank`: exact truncated SVDs that stay low rank.
* :mod:`.merge`: :func:`merge` (adapters in, adapter out) and :func:`merge_to` (sources in, files out).
"""

from __future__ import annotations

from .merge import PROVENANCE_KEY, merge, merge_to
from .methods import METHODS, PEFT_METHODS, Method, get_method

__all__ = ["METHODS", "PEFT_METHODS", "PROVENANCE_KEY", "Method", "get_method", "merge", "merge_to"]
