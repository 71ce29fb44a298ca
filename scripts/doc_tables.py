"""Print the generated tables of the docs, or write them between their markers.

Three tables are generated from the code's own declarations, so that the docs cannot drift from the code:

* ``capabilities``: docs/formats.md's kinds × operations table (:func:`adaptkit.capabilities.capability_markdown`),
  between ``<!-- capabilities:start -->`` and ``<!-- capabilities:end -->``; rerun after adding a kind or a format row
  (``tests/test_capabilities.py`` fails while the copy is stale);
* ``deploy``: docs/deploy.md's feature × runtime table and rule list (:func:`adaptkit.deploy.table.deploy_markdown`),
  between ``<!-- deploy:start -->`` and ``<!-- deploy:end -->``; rerun after changing a rule or adding a runtime
  (``tests/test_deploy_table.py``);
* ``architectures``: docs/formats.md's diffusion architecture × layout table
  (:func:`adaptkit.formats.arch.table.arch_markdown`), between ``<!-- architectures:start -->`` and
  ``<!-- architectures:end -->``; rerun after adding an ``ARCHS`` row (``tests/test_layouts_flux.py``).

Usage: ``python scripts/doc_tables.py [capabilities|deploy|architectures]`` prints the Markdown; ``--write`` replaces the blocks
(all tables when none is named).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptkit import capabilities  # noqa: E402
from adaptkit.deploy import table as deploy_table  # noqa: E402
from adaptkit.formats.arch import table as arch_table  # noqa: E402

#: table name -> (the doc it lives in, what makes it, its start and end markers)
TABLES: dict[str, tuple[Path, Callable[[], str], str, str]] = {
    "capabilities": (ROOT / "docs" / "formats.md", capabilities.capability_markdown, capabilities.START,
                     capabilities.END),
    "deploy": (ROOT / "docs" / "deploy.md", deploy_table.deploy_markdown, deploy_table.START, deploy_table.END),
    "architectures": (ROOT / "docs" / "formats.md", arch_table.arch_markdown, arch_table.START, arch_table.END),
}


def main(argv: list[str] | None = None) -> int:
    """Print the tables, or (``--write``) put them into their docs; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"tables: {', '.join(TABLES)} (default: all)")
    parser.add_argument("--write", action="store_true", help="replace the tables in their docs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in TABLES]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    for name in args.names or TABLES:
        doc, make, start, end = TABLES[name]
        table = make()
        if not args.write:
            sys.stdout.write(table)
            continue
        doc.write_text(capabilities.replace_between_markers(doc.read_text(), table, start, end))
        print(f"wrote the {name} table into {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
