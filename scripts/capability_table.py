"""Print the capability table of docs/formats.md (kinds × operations), or write it between the markers there.

Usage: ``python scripts/capability_table.py`` prints the Markdown; ``--write`` replaces the block between
``<!-- capabilities:start -->`` and ``<!-- capabilities:end -->`` in ``docs/formats.md``. The table comes from
:func:`adaptkit.capabilities.capability_markdown` (the code's own declarations), so rerun it after adding a kind or a
format row; ``tests/test_capabilities.py`` fails while the docs copy is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptkit.capabilities import capability_markdown, replace_between_markers  # noqa: E402

DOC = ROOT / "docs" / "formats.md"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or (``--write``) put it into docs/formats.md; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/formats.md")
    args = parser.parse_args(argv)
    table = capability_markdown()
    if not args.write:
        sys.stdout.write(table)
        return 0
    DOC.write_text(replace_between_markers(DOC.read_text(), table))
    print(f"wrote the capability table into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
