"""``adaptkit check``: will an adapter fully work on a runtime? The target's rules plus the coverage certificate.

:func:`check` runs every rule of the target's table (:data:`adaptkit.deploy.targets.TARGETS`) over the adapter and,
with a base, the coverage certificate (:func:`adaptkit.analysis.coverage.certify_base`: which layers land on a
module of the base and what share of the ``ΔW`` energy they carry). Each finding names the places that break the
rule and the fix ``adaptkit export`` applies. The report is ``ok`` only when nothing would be refused, dropped or
applied wrongly as the adapter is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..analysis.coverage import certify_base
from ..core.adapter import Adapter
from ..core.params import RANK
from ..errors import ConfigError
from ..formats.names import inventory_from_base
from .features import fused_plan
from .fixes import FIXES
from .rules import Context, Finding, Rule, Target
from .targets import get_target

COVERAGE_SOURCE = "adaptkit.analysis.coverage.certify_base"
#: the columns of :meth:`CheckReport.frame`
COLUMNS = ("rule", "verdict", "count", "where", "fix", "needs", "message")


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check` found.

    Args:
        target: the target's name. label: the runtime's name.
        findings: one per rule the adapter meets (accepted ones included, they do not block), then coverage.
        certificate: the coverage certificate against the base, or ``None`` without a base.
        max_rank: the rank limit checked against (``None``: none).
        source: the adapter's provenance.
    """

    target: str
    label: str
    findings: tuple[Finding, ...]
    certificate: Any
    max_rank: int | None
    source: str | None

    @property
    def blocking(self) -> tuple[Finding, ...]:
        """The findings that mean the adapter, as it is, would not fully work on the target."""
        return tuple(f for f in self.findings if f.blocking)

    @property
    def ok(self) -> bool:
        """Nothing blocks (the coverage certificate, when there is one, is part of the findings)."""
        return not self.blocking

    def frame(self) -> pd.DataFrame:
        """One row per finding: rule, verdict, count, where (the first three), fix, needs, message."""
        return pd.DataFrame([f.row() for f in self.findings], columns=list(COLUMNS))

    def header(self) -> dict[str, Any]:
        """The facts printed above the table (and the top level of ``--json``)."""
        cert = self.certificate
        return {
            "target": self.label, "source": self.source or "-",
            "max rank": self.max_rank if self.max_rank is not None else "none",
            "coverage": cert.summary() if cert is not None else "not checked (pass --base BASE)",
            "verdict": "ok" if self.ok else f"{len(self.blocking)} finding(s) block: run adaptkit export",
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the header, ``ok``, the certificate's dict and the findings (``where`` in full)."""
        return {**self.header(), "ok": self.ok,
                "certificate": self.certificate.to_dict() if self.certificate is not None else None,
                "findings": [{"rule": f.rule, "feature": f.feature, "verdict": f.verdict, "where": list(f.where),
                              "fix": f.fix, "needs": f.needs, "message": f.message, "source": f.source}
                             for f in self.findings]}


def make_context(target: Target, base: Any = None, max_rank: int | None = None) -> Context:
    """The :class:`Context` rules run in: the rank limit (the target's default when ``None``) and the base's modules.

    Raises:
        ConfigError: a bad rank, or one the target's rank limit cannot take (vLLM: 1, 8, 16, 32, ..., 512).
    """
    max_rank = RANK.optional(max_rank)
    if max_rank is not None and target.rank_buckets and max_rank not in target.rank_buckets:
        raise ConfigError(f"{target.label} serves ranks up to one of {', '.join(map(str, target.rank_buckets))} "
                          f"(its max_lora_rank); --max-rank {max_rank} is none of them")
    limit = max_rank if max_rank is not None else target.default_max_rank
    inventory = inventory_from_base(base) if base is not None else None
    return Context(target.name, limit, inventory, base)


def needs(rule: Rule, ctx: Context) -> str:
    """What the user must give for ``rule``'s fix: ``--base BASE``, ``--lossy OPTION``, ``--drop GLOB`` (or ``""``)."""
    if rule.verdict == "refused":
        return "--drop GLOB"
    if rule.fix is None:
        return ""
    fix = FIXES[rule.fix]
    parts = []
    if fix.option:
        parts.append(f"--lossy {fix.option}")
    if fix.needs_base and ctx.base is None:
        parts.append("--base BASE")
    return " ".join(parts)


def rule_findings(adapter: Adapter, target: Target, ctx: Context) -> list[Finding]:
    """One :class:`Finding` per rule of ``target`` that ``adapter`` meets, in the table's order."""
    out = []
    for rule in target.rules:
        where = rule.finds(adapter, ctx)
        if where:
            out.append(Finding(rule.id, rule.feature, rule.verdict, tuple(sorted(where)), rule.message, rule.fix,
                               needs(rule, ctx), rule.source))
    return out


def coverage_finding(adapter: Adapter, target: Target, ctx: Context, certificate: Any) -> Finding | None:
    """The layers the certificate finds landing nowhere (those a fused/split rename fixes left out), or ``None``."""
    if certificate is None or certificate.complete:
        return None
    renamed = fused_plan(adapter, ctx)
    missing = sorted(p for p in (getattr(m, "path", m) for m in certificate.missing) if p not in renamed)
    if not missing:
        return None
    return Finding(f"{target.name}.coverage", "coverage", "refused", tuple(missing),
                   f"{len(missing)} layer(s) match no module of the base: {certificate.summary()}", None,
                   "--drop GLOB, or the base the adapter was made for", COVERAGE_SOURCE)


def check_adapter(adapter: Adapter, base: Any = None, target: str = "vllm", max_rank: int | None = None,
                  operation: str = "check") -> CheckReport:
    """:func:`check` on an :class:`Adapter`."""
    tgt = get_target(target)
    ctx = make_context(tgt, base, max_rank)
    certificate = certify_base(adapter, base, operation=operation) if base is not None else None
    return build_report(adapter, tgt, ctx, certificate)


def build_report(adapter: Adapter, target: Target, ctx: Context, certificate: Any = None) -> CheckReport:
    """The :class:`CheckReport` of ``adapter`` on ``target`` in ``ctx`` (with a certificate already made, or none)."""
    findings = rule_findings(adapter, target, ctx)
    cov = coverage_finding(adapter, target, ctx, certificate)
    if cov is not None:
        findings.append(cov)
    return CheckReport(target.name, target.label, tuple(findings), certificate, ctx.max_rank, adapter.source)


__all__ = ["COLUMNS", "CheckReport", "build_report", "check_adapter", "coverage_finding", "make_context", "needs", "rule_findings"]
