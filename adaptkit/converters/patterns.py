"""PEFT's module-name matching rules, as plain functions (no peft import needed at run time).

* ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in dict order) for which
  ``re.match(rf"(.*\\.)?({k})$", module_path)`` matches wins (PEFT's ``get_pattern_key``).
* ``target_modules`` / ``feedforward_modules`` as a list: ``path == t or path.endswith("." + t)``;
  as a string: ``re.fullmatch``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


def pattern_value(pattern: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """The value PEFT resolves for ``path`` from a rank/alpha pattern, or ``default``."""
    for key in pattern or {}:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default


def matches_targets(targets: str | Iterable[str] | None, path: str) -> bool:
    """Whether PEFT's ``target_modules`` rule selects ``path``."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def matches_feedforward(targets: str | Iterable[str] | None, path: str) -> bool:
    """Whether PEFT's IA3 ``feedforward_modules`` rule selects ``path`` (suffix match, no dot needed)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path.endswith(t) for t in targets)


def build_pattern(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Pick the most common value as the default and a pattern of full paths for the rest.

    Full module paths match only themselves under PEFT's rule, so the pattern is exact.
    """
    if not values:
        return None, {}
    default = Counter(values.values()).most_common(1)[0][0]
    return default, {path: v for path, v in values.items() if v != default}
