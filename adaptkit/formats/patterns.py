"""PEFT's module-name matching rules, as plain functions (no peft import needed at run time).

* ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in dict order) for which
  ``re.match(rf"(.*\\.)?({k})$", module_path)`` matches wins (PEFT's ``get_pattern_key``); when none
  matches, PEFT looks the path itself up in the dict. :class:`PatternMatcher` gives exactly that answer
  in time proportional to the path, not to the number of keys (a 200,000-entry ``rank_pattern`` is read
  in about a second instead of minutes).
* ``target_modules`` / ``feedforward_modules`` as a list: ``path == t or path.endswith("." + t)``;
  as a string: ``re.fullmatch``.

How :class:`PatternMatcher` stays exact without running one regex per key: a key without regex syntax
other than ``.`` (nearly every key: module names) matches a path iff some suffix of the path that starts
at the beginning or right after a ``.`` has the key's length and the key's characters wherever the key
has no ``.`` (a ``.`` in a key is the regex wildcard, so ``q.proj`` also matches ``q_proj``). Such keys are
indexed by (length, positions of their dots) and looked up per suffix; the few keys with other regex
syntax (``(q|v)_proj``, ``.*``) are matched with the regex itself, compiled once. Paths holding a newline
(where ``.`` and ``$`` behave differently) use PEFT's regexes directly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

#: regex syntax other than ``.`` that makes a key a real regex (matched by ``re``, not by the index)
_REGEX_SYNTAX = frozenset("\\^$*+?{}[]|()\n")


def _dots(s: str) -> tuple[int, ...]:
    """Positions of the dots in ``s``."""
    if "." not in s:
        return ()
    out, pos = [], -1
    for part in s.split(".")[:-1]:
        pos += len(part) + 1
        out.append(pos)
    return tuple(out)


def _check_value(field_name: str, key: Any, value: Any, kind: str) -> None:
    """Refuse a pattern value that is not a rank (positive int) or an alpha (a real number)."""
    where = f"{field_name}[{key!r}]" if key is not None else field_name
    if kind == "rank":
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        ok = ok or (isinstance(value, float) and value.is_integer() and value > 0)
        if not ok:
            raise ConfigError(f"{where} is {value!r}, but a rank is a positive integer; fix {field_name} in "
                              "adapter_config.json")
    elif not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ConfigError(f"{where} is {value!r}, but an alpha is a number; fix {field_name} in adapter_config.json")


def check_config_values(cfg: Mapping[str, Any]) -> None:
    """Check the rank/alpha fields of a PEFT config: ``r``, ``lora_alpha``/``alpha`` and the two patterns.

    NaN and Inf alphas pass (they are numbers; the adapter is then reported as not finite, see
    :meth:`adaptkit.graph.Adapter.nonfinite`); strings, booleans, lists and non-positive ranks do not.

    Raises:
        ConfigError: naming the field (and the pattern key) and what it must be.
    """
    if cfg.get("r") is not None and not (cfg["r"] == 0 and cfg.get("peft_type") == "OFT"):  # OFT: r=0, oft_block_size
        _check_value("r", None, cfg["r"], "rank")
    for name in ("lora_alpha", "alpha"):
        if cfg.get(name) is not None:
            _check_value(name, None, cfg[name], "alpha")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(name)
        if pattern is not None and not isinstance(pattern, Mapping):
            raise ConfigError(f"{name} is a {type(pattern).__name__}, but it maps module-name patterns to values; "
                              f"fix {name} in adapter_config.json (e.g. {{\"v_proj\": 8}})")


@dataclass(frozen=True)
class _Group:
    """Simple keys of one length with dots at the same positions: projection (dots removed) -> first index."""

    dots: tuple[int, ...]
    dotset: frozenset[int]
    first: dict[str, int] = field(default_factory=dict)


class PatternMatcher:
    """PEFT's ``get_pattern_key`` over one ``rank_pattern``/``alpha_pattern`` dict, built once per dict.

    Args:
        pattern: the pattern dict (``None`` or empty: nothing matches).
        field_name: its config field, for messages.
        kind: ``"rank"`` or ``"alpha"``: every value is checked to be one (:class:`ConfigError` otherwise);
            ``None`` skips the check.

    Raises:
        ConfigError: a key that is not a string, a value of the wrong type, or (when first needed) a key that
            is not a valid regex.
    """

    def __init__(self, pattern: Mapping[str, Any] | None, field_name: str = "pattern", kind: str | None = None) -> None:
        pattern = pattern or {}
        if not isinstance(pattern, Mapping):
            raise ConfigError(f"{field_name} is a {type(pattern).__name__}, but it maps module-name patterns to values; "
                              f"fix {field_name} in adapter_config.json")
        self._pattern = pattern
        self._field = field_name
        self._keys: list[str] = []
        self._by_len: dict[int, list[_Group]] = {}
        groups: dict[tuple[int, tuple[int, ...]], _Group] = {}
        self._regex: list[tuple[int, str]] = []
        self._compiled: dict[int, re.Pattern[str]] = {}
        for i, (key, value) in enumerate(pattern.items()):
            if not isinstance(key, str):
                raise ConfigError(f"{field_name} has the key {key!r}; its keys are module-name patterns (strings)")
            if kind is not None and not (type(value) is int and value > 0 or kind == "alpha" and type(value) is float):
                _check_value(field_name, key, value, kind)  # the common cases above need no further look
            self._keys.append(key)
            if _REGEX_SYNTAX.isdisjoint(key):
                dots = _dots(key)
                group = groups.get((len(key), dots))
                if group is None:
                    group = groups[(len(key), dots)] = _Group(dots, frozenset(dots))
                    self._by_len.setdefault(len(key), []).append(group)
                group.first.setdefault(key.replace(".", ""), i)
            else:
                self._regex.append((i, key))

    def __len__(self) -> int:
        return len(self._keys)

    def _compile(self, i: int, key: str) -> re.Pattern[str]:
        rx = self._compiled.get(i)
        if rx is None:
            try:
                rx = self._compiled[i] = re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise ConfigError(f"{self._field} key {key!r} is not a valid regular expression ({e}); "
                                  f"fix {self._field} in adapter_config.json") from e
        return rx

    def _first_simple(self, path: str) -> int | None:
        best = None
        pdots = _dots(path)
        for k, start in enumerate((0, *(d + 1 for d in pdots))):  # suffixes at the start or right after a dot
            groups = self._by_len.get(len(path) - start)
            if not groups:
                continue
            s = path[start:]
            sdots = tuple(d - start for d in pdots[k:])
            plain = None
            for g in groups:
                if g.dots == sdots:
                    if plain is None:
                        plain = s.replace(".", "")
                    idx = g.first.get(plain)
                elif g.dotset.issuperset(sdots):  # the key's extra dots are wildcards over the path's characters
                    idx = g.first.get("".join(c for j, c in enumerate(s) if j not in g.dotset))
                else:
                    continue
                if idx is not None and (best is None or idx < best):
                    best = idx
        return best

    def index(self, path: str) -> int | None:
        """Position (in dict order) of the key PEFT picks for ``path``, or ``None`` when it picks none."""
        if not self._keys:
            return None
        if "\n" in path:  # `.` and `$` treat a newline specially: ask the regexes themselves
            best = next((i for i, k in enumerate(self._keys) if self._compile(i, k).match(path)), None)
        else:
            best = self._first_simple(path)
            for i, key in self._regex:
                if best is not None and i >= best:
                    break
                if self._compile(i, key).match(path):
                    best = i
                    break
        if best is None and path in self._pattern:  # get_pattern_key falls back to the path itself
            return self._keys.index(path)
        return best

    def key(self, path: str) -> str | None:
        """The key PEFT's ``get_pattern_key`` picks for ``path`` (``None`` when no key applies)."""
        i = self.index(path)
        return None if i is None else self._keys[i]

    def value(self, path: str, default: Any) -> Any:
        """The value PEFT resolves for ``path`` (``pattern.get(get_pattern_key(...), default)``)."""
        key = self.key(path)
        return default if key is None else self._pattern[key]


def pattern_value(pattern: Mapping[str, Any] | None, path: str, default: Any) -> Any:
    """The value PEFT resolves for ``path`` from a rank/alpha pattern, or ``default``.

    Builds a :class:`PatternMatcher` for this one call; to resolve many paths, build one and reuse it.
    """
    return PatternMatcher(pattern).value(path, default)


@dataclass(frozen=True)
class ConfigPatterns:
    """A PEFT config's ``rank_pattern`` and ``alpha_pattern``, indexed once for all the modules of a checkpoint.

    Args:
        rank: matcher of ``rank_pattern``. alpha: matcher of ``alpha_pattern``.
        alpha_overrides: per-module alphas that win over both (``<module>.alpha`` keys of a raw state dict).
    """

    rank: PatternMatcher
    alpha: PatternMatcher
    alpha_overrides: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Mapping[str, Any], alpha_overrides: Mapping[str, float] | None = None) -> ConfigPatterns:
        """Check ``cfg``'s rank/alpha fields (:func:`check_config_values`) and index its patterns."""
        check_config_values(cfg)
        return cls(PatternMatcher(cfg.get("rank_pattern"), "rank_pattern", "rank"),
                   PatternMatcher(cfg.get("alpha_pattern"), "alpha_pattern", "alpha"), dict(alpha_overrides or {}))

    def rank_for(self, module: str, default: Any) -> Any:
        """The rank PEFT gives ``module``: its ``rank_pattern`` value, else ``default``."""
        return self.rank.value(module, default)

    def alpha_for(self, module: str, default: Any) -> float:
        """The alpha PEFT gives ``module`` (an override, its ``alpha_pattern`` value, else ``default``), as a float."""
        if module in self.alpha_overrides:
            return float(self.alpha_overrides[module])
        value = self.alpha.value(module, default)
        if value is None:
            raise ConfigError(f"{module} has no alpha (lora_alpha/alpha is null in adapter_config.json); set it to a number")
        return float(value)


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


def saved_module_of(key: str, modules_to_save: Iterable[str] | None) -> str | None:
    """The module a tensor ``key`` of a PEFT checkpoint belongs to when it is a ``modules_to_save`` copy.

    PEFT wraps every module whose name ends with an entry of ``modules_to_save`` (plain ``str.endswith``,
    as ``peft.utils.other._set_trainable``) and saves its state under the module's own name; the outermost
    such module owns the tensor. ``None`` when no prefix of ``key`` is such a module.
    """
    targets = [t for t in modules_to_save or () if isinstance(t, str) and t]
    if not targets:
        return None
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(t) for t in targets):
            return prefix
    return None


def build_pattern(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Pick the most common value as the default and a pattern of full paths for the rest.

    A full module path matches itself under PEFT's rule and also every path it is a dotted suffix of (``proj_out``
    matches ``single_transformer_blocks.0.proj_out``); such a path is written anchored, ``^proj_out``, which PEFT's
    ``re.match(rf"(.*\.)?({key})$", path)`` matches only at the start. So the pattern is exact.
    """
    if not values:
        return None, {}
    default = Counter(values.values()).most_common(1)[0][0]
    out = {}
    for path, v in values.items():
        if v != default:
            shadows = any(other != path and other.endswith("." + path) for other in values)
            out["^" + path if shadows else path] = v
    return default, out
