"""Print the deploy table of docs/deploy.md (feature × target, and the rules with their sources), or write it there.

Usage: ``python scripts/deploy_table.py`` prints the Markdown; ``--write`` replaces the block between
``<!-- deploy:start -->`` and ``<!-- deploy:end -->`` in ``docs/deploy.md``. The table comes from the rule tables
(:func:`adaptkit.deploy.table.deploy_markdown`), so rerun it after changing a rule or adding a target;
``tests/test_deploy_table.py`` fails while the docs copy is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptkit.deploy.table import deploy_markdown, replace_block

DOC = ROOT / "docs" / "deploy.md"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or (``--write``) put it into docs/deploy.md; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in docs/deploy.md")
    args = parser.parse_args(argv)
    table = deploy_markdown()
    if not args.write:
        sys.stdout.write(table)
        return 0
    DOC.write_text(replace_block(DOC.read_text(), table))
    print(f"wrote the deploy table into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
