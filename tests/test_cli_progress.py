"""Progress bars: on a terminal every long-running command draws one on stderr; piped, or with ``--quiet``, none.

For merge and fuse the terminal is a real pseudo-terminal (``pty``) on the command's stderr, left unsized as a CI
runner's is (tqdm alone then drew nothing, so "a bar only in a terminal" silently meant "never"); stdout stays a
pipe, so the command's result is checked apart from the bar. Every other command runs in-process with a fake
terminal as stderr (``conftest.run_cli_on_tty``): the same decision and the same bars, without starting an
interpreter per command.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptkit.cli import main
from adaptkit.demo import build_example_base, example

from .conftest import run_cli, run_cli_on_tty

pty = pytest.importorskip("pty")
ROOT = Path(__file__).resolve().parents[1]
BAR = "%|"  # tqdm's "  42%|████" between the label and the bar


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def run_on_pty(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """``python -m adaptkit ARGS`` with stderr on a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "adaptkit", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, cwd=cwd, env=_env())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal (EIO on Linux)
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def run_piped(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=300, check=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_example_base(tmp_path_factory.mktemp("progress") / "base")


def _merge_args(out: Path) -> list[str]:
    return ["merge", str(example("lora_code")), str(example("lora_math")), "-o", str(out), "--method", "ties_svd",
            "--density", "0.5", "--rank", "4"]


def test_merge_bar_on_a_terminal_only(tmp_path, monkeypatch):
    code, out, term = run_on_pty(*_merge_args(tmp_path / "a"), cwd=tmp_path)
    assert code == 0 and out.startswith("merged 2 adapters"), (out, term)
    assert "merge (ties_svd):" in term and BAR in term and BAR not in out, term
    piped = run_piped(*_merge_args(tmp_path / "b"), cwd=tmp_path)
    assert piped.returncode == 0 and piped.stderr == "" and BAR not in piped.stdout, piped.stderr
    code, out, term = run_on_pty(*_merge_args(tmp_path / "c-q"), "-q", cwd=tmp_path)
    assert code == 0 and out.startswith("merged 2 adapters") and term == "", term
    res, term = run_cli_on_tty(monkeypatch, *_merge_args(tmp_path / "c--quiet"), "--quiet")  # the long spelling
    assert res.returncode == 0 and res.stdout.startswith("merged 2 adapters") and term == res.stderr == "", term


def test_fuse_bar_on_a_terminal_only(tmp_path, base, monkeypatch):
    args = ["fuse", str(base), str(example("lora_code")), "-o"]
    code, out, term = run_on_pty(*args, str(tmp_path / "a"), cwd=tmp_path)
    assert code == 0 and out.startswith("output"), (out, term)
    assert "fuse:" in term and BAR in term and "model.safetensors:" in term, term
    plain = run_cli(*args, str(tmp_path / "b"))  # stderr no terminal (CliRunner's buffer): no bar
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    res, term = run_cli_on_tty(monkeypatch, *args, str(tmp_path / "c"), "-q")
    assert res.returncode == 0 and term == res.stderr == "", term
    forced = run_piped(*args, str(tmp_path / "d"), "--progress", cwd=tmp_path)  # a bar into a log, when asked
    assert forced.returncode == 0 and "fuse:" in forced.stderr, forced.stderr


@pytest.mark.parametrize("command,label", [
    ("info", "status:"), ("status", "status:"), ("convert", "convert:"), ("analyze", "analyze:"),
    ("compare", "compare:"), ("unfuse", "fuse:"), ("extract", "extract:"), ("loftq", "loftq:"),
])
def test_every_long_command_draws_a_bar_on_a_terminal(tmp_path, base, monkeypatch, command, label):
    """In-process, stderr a (fake) terminal: each command passes ``progress`` down to its bars; with ``-q`` it draws
    nothing and prints no note. (merge and fuse above run on a real pseudo-terminal; the demo's bars are checked by
    tests/test_cli_info_demo.py::test_demo_runs_end_to_end. convert draws its bar where it computes: the SVD of a
    lossy step; a lossless one is file copying.)"""
    lora, out = str(example("lora_code")), str(tmp_path / "out")
    args = {
        "info": [lora], "status": [lora], "analyze": [lora], "convert": ["->peft", str(example("lycoris_loha.safetensors")), out, "--kind", "lora", "--base", str(base)],
        "compare": [lora, str(example("lora_math"))], "unfuse": [str(base), lora, "-o", out],
        "extract": [str(base), str(base), "-o", out, "--rank", "2", "--norms", "save"],
        "loftq": [str(base), "-o", out, "--target-modules", "q_proj", "--rank", "2"],
    }[command]
    if command == "extract":  # a tuned model: the base with lora_code fused in
        import adaptkit as ak

        ak.fuse(base, lora, tmp_path / "tuned", progress=False)
        args[1] = str(tmp_path / "tuned")
    res, term = run_cli_on_tty(monkeypatch, command, *args)
    assert res.returncode == 0, (res.stdout, res.stderr, term)
    assert label in term and BAR in term, term
    assert BAR not in res.stdout and BAR not in res.stderr
    quiet_out = str(tmp_path / "quiet")
    quiet_args = [quiet_out if a == out else a for a in args]
    res, term = run_cli_on_tty(monkeypatch, command, *quiet_args, "-q")
    assert res.returncode == 0 and term == "" and res.stderr == "", (term, res.stderr)


def test_every_command_takes_quiet_and_progress():
    runner = CliRunner()
    for name in main.list_commands(None):
        help_text = runner.invoke(main, [name, "--help"]).stdout
        assert "-q, --quiet" in help_text and "--progress / --no-progress" in help_text, name
    res = runner.invoke(main, ["merge", "a", "b", "-o", "x", "--quiet", "--progress"])
    assert res.exit_code == 1 and res.stderr.startswith("error: --quiet and --progress exclude each other"), res.output
    assert res.stderr.rstrip().endswith("(see 'adaptkit merge --help')"), res.stderr


def test_library_is_silent_off_a_terminal(capfd):
    """Called from Python with stderr not a terminal, nothing is drawn; progress=True draws anyway."""
    import adaptkit as ak

    adapters = [example("lora_code"), example("lora_math")]
    ak.merge(adapters, method="ties_svd", density=0.5, rank=4)
    assert capfd.readouterr().err == ""
    ak.merge(adapters, method="ties_svd", density=0.5, rank=4, progress=True)
    assert "merge (ties_svd)" in capfd.readouterr().err
