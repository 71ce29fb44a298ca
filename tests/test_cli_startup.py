"""Cold start: ``adaptkit --help`` / ``--version`` / ``CMD --help`` import neither torch nor pandas, and ``import
adaptkit`` is lazy (PEP 562) while every public name still resolves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "numpy", "transformers", "huggingface_hub", "safetensors")
COMMANDS = ("info", "status", "merge", "convert", "fuse", "unfuse", "extract", "loftq", "analyze", "compare", "demo")

# runs the CLI as `python -m adaptkit ARGS` does, then prints which heavy packages got imported
_PROBE = """
import json, runpy, sys
sys.argv = ["adaptkit", *json.loads(sys.argv[1])]
try:
    runpy.run_module("adaptkit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}), file=sys.__stderr__)
""" % (HEAVY,)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _probe(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                         env=_env(), timeout=300, check=False)
    return json.loads(res.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("-h",), *((c, "--help") for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_and_version_import_no_torch_or_pandas(args):
    got = _probe(*args)
    assert got["code"] in (0, None), got
    assert got["loaded"] == [], f"adaptkit {' '.join(args)} imported {got['loaded']}"


def _script() -> Path:
    script = Path(sys.executable).parent / "adaptkit"
    if not script.exists():
        pytest.skip("the adaptkit console script is not installed next to this interpreter")
    return script


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("convert", "--help")], ids=" ".join)
def test_console_script_importtime_has_no_torch_or_pandas(args):
    """``python -X importtime adaptkit ARGS``: the import log names no heavy package."""
    res = subprocess.run([sys.executable, "-X", "importtime", str(_script()), *args], capture_output=True, text=True,
                         env=_env(), timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "adaptkit.cli" in imported, "the log does not show adaptkit being imported"
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert res.stdout.startswith("adaptkit, version" if args == ("--version",) else "Usage: adaptkit")


def test_help_is_fast():
    """Generous bound (the target is 0.3 s; before the lazy package it took ``import torch`` + 1.1 s)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        res = subprocess.run([str(_script()), "--help"], capture_output=True, text=True, env=_env(), timeout=300)
        times.append(time.perf_counter() - start)
        assert res.returncode == 0 and "Commands:" in res.stdout
    assert min(times) < 1.0, f"adaptkit --help took {min(times):.2f} s (best of 3)"


def test_public_names_resolve_lazily():
    """``import adaptkit`` imports no torch; every name of __all__ resolves, is listed by dir() and imports with
    ``from adaptkit import X``; importing the operations' modules leaves the public functions in place."""
    code = """
import sys
import adaptkit as ak
assert "torch" not in sys.modules and "pandas" not in sys.modules, sorted(m for m in sys.modules if m in ("torch", "pandas"))
assert set(ak.__all__) <= set(dir(ak)), set(ak.__all__) - set(dir(ak))
import adaptkit.ops.fuse, adaptkit.ops.convert, adaptkit.live.inject  # binds the subpackages on the package
for name in ak.__all__:
    value = getattr(ak, name)
    exec(f"from adaptkit import {name} as imported")
    assert imported is value, name
    assert not isinstance(value, type(sys)), (name, value)
assert callable(ak.load) and ak.fuse is sys.modules["adaptkit.ops.fuse"].fuse and ak.extract is ak.fuse.__globals__["extract"]
assert ak.__version__ == __import__("adaptkit._version")._version.__version__
ns = {}
exec("from adaptkit import *", ns)
assert set(ak.__all__) <= set(ns), set(ak.__all__) - set(ns)
try:
    ak.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise SystemExit("no AttributeError")
print("ok", len(ak.__all__))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr[-3000:]


def test_version_matches_pyproject():
    import re

    from adaptkit._version import __version__

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None and __version__ == declared.group(1)
