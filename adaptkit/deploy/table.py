"""The deploy table of docs/deploy.md (adapter feature × target -> accepted / fixed exactly / fixed with loss /
refused) and the list of rules with their sources, generated from the rule tables (``scripts/doc_tables.py deploy``)."""

from __future__ import annotations

from ..capabilities import replace_between_markers
from .features import FEATURES
from .fixes import FIXES
from .targets import TARGETS

START, END = "<!-- deploy:start -->", "<!-- deploy:end -->"
#: what each verdict reads as in the table
CELLS = {"accepted": "accepted", "exact": "fixed exactly", "lossy": "fixed with loss", "refused": "refused"}
#: a feature a target has no rule for
NO_RULE = "·"


def _cell(target, feature: str) -> str:
    rule = target.rule(feature)
    if rule is None:
        return NO_RULE
    text = CELLS[rule.verdict]
    if rule.fix is not None and FIXES[rule.fix].option:
        text += f" (`--lossy {FIXES[rule.fix].option}`)"
    if rule.fix is not None and FIXES[rule.fix].needs_base:
        text += ", needs `--base`"
    return text


def deploy_markdown() -> str:
    """The feature × target table, then one line per rule: id, verdict, fix, source."""
    targets = list(TARGETS.values())
    lines = ["| feature | " + " | ".join(t.label for t in targets) + " |",
             "| --- | " + " | ".join("---" for _ in targets) + " |"]
    for name, feature in FEATURES.items():
        if not any(t.rule(name) for t in targets):
            continue
        lines.append(f"| {feature.label}: {feature.description} | " + " | ".join(_cell(t, name) for t in targets) + " |")
    lines += ["", f"`{NO_RULE}`: no rule (the runtime treats it as any other layer). Versions read: "
              + "; ".join(f"{t.label}: {t.version}" for t in targets if t.version) + ".", "",
              "| rule | verdict | fix | what the runtime does | source |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        for r in t.rules:
            lines.append(f"| `{r.id}` | {r.verdict} | {f'`{r.fix}`' if r.fix else '-'} | {r.message.replace('|', '/')} "
                         f"| {r.source.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with what lies between :data:`START` and :data:`END` replaced by ``table``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    return replace_between_markers(text, table, START, END)


__all__ = ["CELLS", "END", "NO_RULE", "START", "deploy_markdown", "replace_block"]
