"""docs/deploy.md holds the table generated from the rule tables; a rule change without regenerating it fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptkit.deploy import Rule, Target, register_target
from adaptkit.deploy.features import FEATURES
from adaptkit.deploy.table import END, START, deploy_markdown, replace_block
from adaptkit.deploy.targets import TARGETS

DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def test_docs_table_is_the_generated_one():
    text = DOC.read_text()
    assert replace_block(text, deploy_markdown()) == text, \
        "docs/deploy.md's deploy table is stale: run python scripts/doc_tables.py deploy --write"


def test_cells_follow_the_rules():
    table = deploy_markdown()
    row = next(l for l in table.splitlines() if l.startswith("| DoRA"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    labels = [t.label for t in TARGETS.values()]
    assert cells[labels.index("vLLM")].startswith("fixed with loss (`--lossy dora`)")
    assert cells[labels.index("PEFT")] == "accepted"
    assert "`vllm.dora` | lossy | `fold_dora`" in table


def test_a_changed_rule_changes_the_table():
    toy = Target("toyrt", "ToyRT", "peft", (Rule("toyrt.dora", "dora", "refused", FEATURES["dora"].detect,
                                                  "ToyRT refuses DoRA", None, "toyrt/loader.py"),))
    register_target(toy)
    try:
        assert "ToyRT" in deploy_markdown() and "toyrt/loader.py" in deploy_markdown()
        assert replace_block(DOC.read_text(), deploy_markdown()) != DOC.read_text()
    finally:
        TARGETS.pop("toyrt")


def test_markers_are_required():
    with pytest.raises(ValueError, match="deploy:start"):
        replace_block("no markers here", "x")
    assert replace_block(f"a {START} old {END} b", "new\n") == f"a {START}\nnew\n{END} b"
