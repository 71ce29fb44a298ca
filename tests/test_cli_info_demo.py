"""`adaptkit info`, `--version` and `adaptkit demo` as a user runs them."""

from __future__ import annotations

import csv
import io
import json

import pytest

import adaptkit as ak
from adaptkit.demo import example

from .conftest import run_cli, run_cli_on_tty

BAR = "%|"  # tqdm's "  42%|████" between the label and the bar


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0 and ak.__version__ in res.stdout


def test_info_text_json_csv():
    path = example("lora_code")
    text = run_cli("info", str(path))
    assert text.returncode == 0, text.stderr
    assert "format" in text.stdout and "peft" in text.stdout and "4: 6, 8: 2" in text.stdout
    assert "model.layers.0.mlp.down_proj" in text.stdout
    payload = json.loads(run_cli("info", str(path), "--json").stdout)
    assert payload["num_layers"] == 8 and payload["ranks"] == {"4": 6, "8": 2}
    assert payload["base_model"] == "adaptkit-examples/tiny-llama"
    a = ak.load(path)
    for row in payload["layers"]:
        layer = a.layers[row["module"]]
        assert row["rank"] == layer.rank and row["scale"] == layer.scale
        dense = float(layer.delta().norm())
        assert abs(row["delta_norm"] - dense) <= 1e-4 * dense
    rows = list(csv.DictReader(io.StringIO(run_cli("info", str(path), "--csv").stdout)))
    assert len(rows) == 8 and set(rows[0]) >= {"module", "kind", "shape", "rank", "alpha", "scale", "delta_norm"}


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """The demo once on a (fake) terminal: its steps' bars on stderr, not on stdout; then again with -q, which
    replaces its own output and draws nothing (the demo is the slowest command: it runs twice in the suite, here)."""
    res, term = run_cli_on_tty(monkeypatch, "demo", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    assert "merge (" in term and BAR in term, term
    assert BAR not in res.stdout
    assert "done" in res.stdout
    saved = ak.load(tmp_path / "demo" / "lora_code_peft")
    assert len(saved) == 8
    assert "== analyze" in res.stdout and "suggested merge method for all three: none" in res.stdout  # ends with analysis
    assert "lora_math  lora_code" in res.stdout and "ties_svd" in res.stdout  # ranks 8 vs 4: the dense-delta TIES
    assert "vllm.dora (lossy, 4 layers)" in res.stdout and "8/8 layers land" in res.stdout  # check, then export
    assert ak.load(tmp_path / "demo" / "lora_code_vllm").config["lora_alpha"] == 8  # one global alpha, scales in B
    assert (tmp_path / "demo" / "lora_code.gguf").stat().st_size > 0  # gguf is a test extra
    for report in ("analysis_report.html", "compare_report.html"):  # matplotlib is a test extra
        assert "data:image/png;base64," in (tmp_path / "demo" / report).read_text()
    again, term = run_cli_on_tty(monkeypatch, "demo", "--out", str(tmp_path / "demo"), "-q")  # replaces its own output
    assert again.returncode == 0, again.stderr
    assert term == "" and again.stderr == "", (term, again.stderr)
    assert len(ak.load(tmp_path / "demo" / "lora_code_peft")) == 8


def test_failed_demo_leaves_nothing(tmp_path, monkeypatch):
    import pytest

    from adaptkit import demo

    def broken(ctx):
        raise ak.FormatError("a step failed")

    monkeypatch.setattr(demo, "STEPS", [demo.STEPS[0], ("broken", broken)])
    with pytest.raises(ak.FormatError):
        demo.run_demo(tmp_path / "demo", echo=lambda _: None)
    assert not (tmp_path / "demo").exists()



def test_info_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "adaptkit.cli", "info", str(example("lora_code"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before adaptkit prints anything (`adaptkit info X | head`)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and stderr == "", stderr


# ------------------------------------------------------------------ examples in every --help, kept runnable


def _example_lines(text: str) -> list[str]:
    """The command lines under 'Examples:' in a help text (comments after '#' dropped)."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.strip() == "Examples:":
            inside = True
        elif inside and line.strip().startswith("adaptkit "):
            lines.append(line.split("  #")[0].strip())
        elif inside and line.strip() and not line.startswith(" "):
            inside = False
    return lines


def _parses(line: str) -> None:
    """Parse a documented command line with adaptkit's own click command (nothing runs)."""
    import shlex

    import click

    from adaptkit.cli import main

    words = shlex.split(line)
    assert words[0] == "adaptkit", line
    if words[1].startswith("-"):  # adaptkit --help / --version: click exits 0 after printing
        with pytest.raises(click.exceptions.Exit) as done:
            main.make_context("adaptkit", words[1:])
        assert done.value.exit_code == 0, line
        return
    command = main.get_command(None, words[1])
    assert command is not None, line
    command.make_context(words[1], words[2:])


def test_every_help_shows_examples_that_parse():
    from click.testing import CliRunner

    from adaptkit.cli import main

    runner = CliRunner()
    for name in [None, *main.list_commands(None)]:
        res = runner.invoke(main, [name, "--help"] if name else ["--help"])
        assert res.exit_code == 0, res.output
        examples = _example_lines(res.stdout)
        assert examples, f"'adaptkit {name or ''} --help' shows no example"
        for line in examples:
            assert name is None or (line + " ").startswith(f"adaptkit {name} "), (name, line)
            _parses(line)


def test_readme_command_lines_parse():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## On the command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("adaptkit ")]
    assert len(lines) >= 5
    for line in lines:
        _parses(line)
