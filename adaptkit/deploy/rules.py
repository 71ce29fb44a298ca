"""What a deploy target's rule table is made of: :class:`Rule`, :class:`Target`, the :class:`Context` rules read, and
the :class:`Finding` rows ``check`` returns.

A rule says what one runtime does with one adapter feature (DoRA, a LoRA bias, ``rank_pattern`` ...): its
``verdict`` is what ``adaptkit export`` does about it:

* ``accepted``: the runtime loads it with the same effect; nothing to do.
* ``exact``: the runtime would refuse it or apply it wrongly, and adaptkit rewrites it with the same effect
  (dense ``ΔW`` unchanged up to float rounding), by default.
* ``lossy``: adaptkit can rewrite it only with a loss (reported per layer), and only when asked (``lossy=``).
* ``refused``: no rewrite keeps it; the layers must be dropped explicitly (``drop=``) or the adapter fused.

``finds(adapter, ctx)`` names what breaks the rule (module paths, config fields); an empty list means the adapter
does not use the feature. ``fix`` names a row of :data:`adaptkit.deploy.fixes.FIXES`. ``source`` cites the
runtime's file, function and version the rule was read from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.adapter import Adapter
from ..errors import ConfigError

#: what export does about a rule, in the order the docs table explains them
VERDICTS = ("accepted", "exact", "lossy", "refused")


@dataclass(frozen=True)
class Context:
    """What rules may look at besides the adapter.

    Args:
        target: the target's name.
        max_rank: the largest rank the target will serve (``None``: no limit).
        inventory: the base model's modules (:class:`adaptkit.formats.names.Inventory`) or ``None`` without a base.
        base: the base as given (path, hub id), or ``None``.
    """

    target: str
    max_rank: int | None = None
    inventory: Any = None
    base: Any = None


@dataclass(frozen=True)
class Rule:
    """One runtime's treatment of one adapter feature.

    Args:
        id: ``<target>.<feature>`` (``vllm.dora``).
        feature: the feature's name in :data:`adaptkit.deploy.features.FEATURES` (a column of the docs table).
        verdict: one of :data:`VERDICTS`.
        finds: ``(adapter, ctx) -> [what breaks the rule]`` (module paths or config fields).
        message: what the runtime does, one line.
        fix: the fix's name in :data:`adaptkit.deploy.fixes.FIXES` (``None`` for accepted and refused rules).
        source: the runtime file, function and version the rule comes from.
    """

    id: str
    feature: str
    verdict: str
    finds: Callable[[Adapter, Context], list[str]]
    message: str
    fix: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ConfigError(f"rule {self.id} has verdict {self.verdict!r}; use one of {', '.join(VERDICTS)}")
        if (self.fix is None) != (self.verdict in ("accepted", "refused")):
            raise ConfigError(f"rule {self.id}: an {self.verdict} rule {'needs' if self.fix is None else 'has no'} fix")


@dataclass(frozen=True)
class Target:
    """A deploy target: a runtime, the format its adapters are written in, and its rule table.

    Args:
        name: the ``--target`` name (``vllm``).
        label: the runtime's name for messages (``vLLM``).
        output_format: the :data:`adaptkit.formats.FORMATS` name export writes (``peft``).
        rules: the rule table, one row per feature the runtime treats specially.
        default_max_rank: the rank limit when the user gives none (vLLM's ``max_lora_rank`` default 16), or ``None``.
        rank_buckets: the ranks the runtime's rank limit may take (vLLM's ``MaxLoRARanks``); empty: any.
        version: the runtime version the table was read from, for the docs.
        write_options: options passed to the format writer (SGLang's leaf ``target_modules``).
        write: a writer of the target's own, ``write(adapter, out, *, base, overwrite) -> Path``, used instead of
            saving in ``output_format`` (llama.cpp's GGUF files need the base for their tensor names).
    """

    name: str
    label: str
    output_format: str
    rules: tuple[Rule, ...]
    default_max_rank: int | None = None
    rank_buckets: tuple[int, ...] = ()
    version: str = ""
    write_options: dict[str, Any] = field(default_factory=dict)
    write: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        seen = [r.feature for r in self.rules]
        dup = sorted({f for f in seen if seen.count(f) > 1})
        if dup:
            raise ConfigError(f"target {self.name} has several rules for {', '.join(dup)}; keep one rule per feature")

    def rule(self, feature: str) -> Rule | None:
        """The rule for a feature, or ``None`` when the target treats it like any other adapter."""
        return next((r for r in self.rules if r.feature == feature), None)


@dataclass(frozen=True)
class Finding:
    """One rule an adapter breaks on a target (or a feature it uses that the target accepts).

    Args:
        rule: the rule's id. feature: its feature. verdict: its verdict.
        where: what breaks it (module paths, config fields), sorted.
        message: the rule's message. fix: the fix export applies (``None``: none).
        needs: what the fix needs from the user (``"--base"``, ``"--lossy dora"``, ``"--drop GLOB"``) or ``""``.
        source: the rule's source.
    """

    rule: str
    feature: str
    verdict: str
    where: tuple[str, ...]
    message: str
    fix: str | None
    needs: str
    source: str

    @property
    def blocking(self) -> bool:
        """The adapter as it is would not fully work on the target (anything but ``accepted``)."""
        return self.verdict != "accepted"

    def row(self) -> dict[str, Any]:
        """A table row: rule, feature, verdict, how many and which (the first three) places, fix, needs, message."""
        shown = ", ".join(self.where[:3]) + (f" (+{len(self.where) - 3} more)" if len(self.where) > 3 else "")
        return {"rule": self.rule, "verdict": self.verdict, "count": len(self.where), "where": shown,
                "fix": self.fix or "-", "needs": self.needs or "-", "message": self.message}


__all__ = ["VERDICTS", "Context", "Finding", "Rule", "Target"]
