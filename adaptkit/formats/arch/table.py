"""docs/formats.md's architecture × layout table, generated from the ``ARCHS`` table (``scripts/doc_tables.py``)."""

from __future__ import annotations

from . import ARCHS, Arch

START = "<!-- architectures:start -->"
END = "<!-- architectures:end -->"
#: the layouts of the table, in column order
LAYOUTS = ("diffusers", "kohya", "comfyui", "xlabs", "ai-toolkit")


def _packed(arch: Arch) -> str:
    seen: dict[str, int] = {}
    for rule in arch.rules:
        if rule.fused:
            seen.setdefault(rule.original.rsplit(".", 1)[-1], len(rule.diffusers))
    return ", ".join(f"`{name}` ({n})" for name, n in seen.items()) or "none"


def _cell(arch: Arch, layout: str) -> str:
    if layout not in arch.layouts:
        return "—"
    reads = arch.extra.get("diffusers_reads")
    oracle = " (diffusers reads it)" if reads is not None and layout in reads else ""
    return f"read, write{oracle}"


def arch_markdown() -> str:
    """The Markdown table: one row per architecture, a column per layout, the packed projections, the sources."""
    head = ["architecture (`--arch`)", "diffusers class", *LAYOUTS, "packed projections", "module map from"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for arch in ARCHS.values():
        cells = [f"{arch.label} (`{arch.name}`)", f"`{arch.model_class}`", *(_cell(arch, lay) for lay in LAYOUTS),
                 _packed(arch), arch.notes or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["END", "LAYOUTS", "START", "arch_markdown"]
