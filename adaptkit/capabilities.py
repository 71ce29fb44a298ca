"""The capability table: what every operation does with every adapter kind, built from the code's declarations.

One row per kind of :data:`adaptkit.core.kinds.KINDS` (registered kinds included), one column per operation:

* ``read <format>`` / ``write <format>``: each format's own ``kind_support()`` (PEFT: its
  :data:`~adaptkit.formats.peft_layers.PEFT_NAMES` rows; kohya/LyCORIS: its layer builders and writer limits;
  diffusers: the kinds it stores); formats registered with :func:`adaptkit.register_format` get columns too.
* ``fuse``, ``unfuse``, ``merge``, ``convert to LoRA``: the kind's own ``operations()`` (derived from the class:
  additive kinds in :class:`~adaptkit.core.kinds.common.KindBase`, IA3 and the base-dependent kinds override it).
* ``inject``: whether the kind's layers adapt a module the live wrapper wraps
  (:data:`adaptkit.core.kinds.base.MODULE_TYPES`, against the kind's ``declared_module_type()``).

Nothing here names a kind, so the table cannot drift from the code: ``scripts/doc_tables.py capabilities`` prints it,
``docs/formats.md`` holds it between markers, and ``tests/test_capabilities.py`` regenerates and compares.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .core.kinds import KINDS
from .core.kinds.base import MODULE_TYPES
from .formats.registry import FORMATS

#: the operations of the kind-level columns, in table order: operations() key -> column name
KIND_OPERATIONS = {"fuse": "fuse", "unfuse": "unfuse", "merge": "merge", "lora": "convert to LoRA"}
#: the markers between which docs/formats.md holds the generated table
START, END = "<!-- capabilities:start -->", "<!-- capabilities:end -->"
#: what each value means, printed under the table
LEGEND = (
    "`exact`: no loss beyond float rounding; `lossy (report)`: the operation reports what it lost (energy, "
    "relative error); `needs base`: the result is a function of the base weight: exact with the base "
    "model (`convert --base`, `ak.convert(..., base=...)`: exact at full rank, lossy (report) below), refused without; `limited`: the format refuses some layers of "
    "the kind all the same and says why (DoRA per input, Conv1D, a LoRA bias); `—`: the format has no layers of "
    "this kind (saving refuses them and suggests converting to LoRA or fusing); merge is exact for `cat` / "
    "`task_arithmetic`, lossy (report) where an SVD compresses to a rank."
)


def _format_cells(kind: str) -> dict[str, str]:
    cells: dict[str, str] = {}
    for name, fmt in FORMATS.items():
        declared = getattr(fmt, "kind_support", None)
        support = declared().get(kind) if declared is not None else None
        for op in ("read", "write"):
            col = f"{op} {name}"
            if declared is None:
                cells[col] = "not declared"
            elif support is None or not getattr(support, op):
                cells[col] = "—"
            else:
                cells[col] = "exact, limited" if op == "write" and support.limited else "exact"
    return cells


def _kind_cells(cls: type) -> dict[str, str]:
    ops = cls.operations()
    return {col: ops.get(key, "not declared") for key, col in KIND_OPERATIONS.items()}


def _inject_cell(cls: type) -> str:
    module_type = cls.declared_module_type()
    if module_type is None or module_type in MODULE_TYPES:
        return "exact"
    return f"refused: {module_type} layers (inject wraps Linear, Conv and Embedding modules)"


def capability_rows() -> list[dict[str, str]]:
    """One dict per kind of :data:`~adaptkit.core.kinds.KINDS`: ``kind``, the format columns, the operations."""
    rows = []
    for kind, cls in KINDS.items():
        rows.append({"kind": kind, "class": cls.__name__, **_format_cells(kind), **_kind_cells(cls),
                     "inject": _inject_cell(cls)})
    return rows


def capability_table() -> Any:
    """The capability table as a pandas DataFrame, one row per kind (index ``kind``).

    Columns: ``class``, ``read <format>`` / ``write <format>`` for every format of
    :data:`~adaptkit.formats.registry.FORMATS`, ``fuse``, ``unfuse``, ``merge``, ``convert to LoRA``, ``inject``.
    """
    return pd.DataFrame(capability_rows()).set_index("kind")


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def capability_markdown() -> str:
    """The table as Markdown (a header, one line per kind, and the legend), as ``docs/formats.md`` holds it."""
    rows = capability_rows()
    cols = list(rows[0]) if rows else ["kind"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_escape(f"`{row[c]}`" if c == "kind" else row[c]) for c in cols) + " |")
    return "\n".join([*lines, "", LEGEND]) + "\n"


def replace_between_markers(text: str, table: str, start: str = START, end: str = END) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers (by default this table's) replaced by
    ``table``; the generated tables of the docs (capabilities, deploy) share it.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"the text has no {start} ... {end} block; add the two markers where the table goes")
    return text[: i + len(start)] + "\n" + table + text[j:]


__all__ = ["END", "KIND_OPERATIONS", "LEGEND", "START", "capability_markdown", "capability_rows", "capability_table",
           "replace_between_markers"]
