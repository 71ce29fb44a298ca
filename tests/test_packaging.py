"""The test extra declares every package the suite and the library import (a fresh venv must pass CI).

A green run on a machine where packages were installed by hand once hid two missing test dependencies
(``attrs`` for peft's CorDA, ``scipy`` for the NF4 oracle). These tests read the imports of the code and
the tests and compare them with ``pyproject.toml``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"adaptkit", "tests", "conftest", *(p.stem for p in ROOT.joinpath("scripts").glob("*.py")), "benchmarks"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imported_top_levels() -> dict[str, str]:
    """Top-level module name -> one file importing it, for every absolute import in adaptkit/ and tests/."""
    found: dict[str, str] = {}
    for path in [*ROOT.joinpath("adaptkit").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
                 *ROOT.joinpath("benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_top_levels().items()):
        if module in sys.stdlib_module_names or module in LOCAL or module.startswith("test_"):
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if not owners:
            missing.append(f"{module} (imported in {where}) is not installed")
        elif not owners & declared:
            missing.append(f"{module} (imported in {where}) comes from {sorted(owners)}, not declared in pyproject.toml")
    assert not missing, "; ".join(missing)


def test_peft_corda_imports():
    # peft's CorDA module imports attrs without declaring it; the test extra must bring it
    importlib.import_module("peft.tuners.lora.corda")
