"""click's own usage errors follow the CLI rule too: one ``error: ...`` line on stderr, exit code 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptkit.cli import main

from .conftest import run_cli

# (arguments, what the one line must say, the command whose --help it points to)
CASES = [
    (["info"], "error: missing argument 'SOURCE'", "info"),
    (["convert", "->peft", "src", "OUT", "--rnak", "2"], "error: no such option: --rnak", "convert"),
    (["info", "src", "--jsn"], "error: no such option '--jsn'; did you mean --json", "info"),
    (["loftq", "base", "--out", "OUT", "--bits", "3"], "error: invalid value for '--bits': '3' is not one of '4', '8'",
     "loftq"),
    (["merge", "a", "b", "-o", "OUT", "--rank", "x"], "error: invalid value for '--rank': 'x' is not a valid integer",
     "merge"),
    (["fuse", "base", "a", "--dtype", "f8"], "error: invalid value for '--dtype': 'f8' is not one of", "fuse"),
    (["convert", "only-one"], "error: expected 'FROM->TO' SOURCE OUT", "convert"),
    (["nosuch"], "error: no such command 'nosuch'", None),
    (["--bogus"], "error: no such option '--bogus'", None),
    (["info", "src", "--json", "--csv"], "error: --json and --csv exclude each other", "info"),
]


def _check(code: int, stderr: str, stdout: str, expected: str, hint: str) -> None:
    assert code == 1, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(expected), lines[0]
    assert lines[0].endswith(f"{hint} --help')"), lines[0]
    assert "Usage:" not in stderr + stdout and "Traceback" not in stderr and stdout == ""


@pytest.mark.parametrize("args,expected,command", CASES)
def test_usage_errors_clirunner(tmp_path, args, expected, command):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    res = CliRunner().invoke(main, args)
    _check(res.exit_code, res.stderr, res.stdout, expected, "adaptkit" + (f" {command}" if command else ""))
    assert not (tmp_path / "out").exists()


def test_usage_errors_subprocess(tmp_path):
    for args, expected, command in CASES:
        res = run_cli(*args, cwd=tmp_path)
        _check(res.returncode, res.stderr, res.stdout, expected, "adaptkit.cli" + (f" {command}" if command else ""))
    assert not list(tmp_path.iterdir())


def test_usage_errors_console_script(tmp_path):
    script = Path(sys.executable).parent / "adaptkit"
    if not script.exists():
        pytest.skip("the adaptkit console script is not installed next to this interpreter")
    res = subprocess.run([str(script), "loftq", "base", "--out", "o", "--bits", "3"], capture_output=True, text=True,
                         check=False, cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr == ("error: invalid value for '--bits': '3' is not one of '4', '8' "
                          "(see 'adaptkit loftq --help')\n"), res.stderr


def test_help_version_and_no_command_unchanged():
    runner = CliRunner()
    for args in (["--help"], ["-h"], ["info", "--help"], ["loftq", "-h"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 0 and res.stdout.startswith("Usage: adaptkit"), (args, res.output)
    res = runner.invoke(main, ["--version"])
    assert res.exit_code == 0 and "adaptkit, version" in res.stdout
    res = runner.invoke(main, [])  # no command: click's help, as before
    assert "Commands:" in res.output and "error:" not in res.output


def test_python_dash_m_adaptkit(tmp_path):
    res = subprocess.run([sys.executable, "-m", "adaptkit", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "adaptkit" in res.stdout, res.stderr
