"""click's own usage errors follow the CLI rule too: one ``error: ...`` line on stderr, exit code 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adaptkit.cli import main

from .conftest import run_cli, run_cli_process

# (arguments, what the one line must say, the command whose --help it points to)
CASES = [
    (["info"], "error: missing argument 'SOURCE'", "info"),
    (["convert", "->peft", "src", "OUT", "--rnak", "2"], "error: no such option '--rnak'; did you mean --rank?", "convert"),
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
        res = run_cli_process(*args, cwd=tmp_path)
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


# ------------------------------------------------------------------ conversion specs on the real command line
# Every spec form the docs advertise: a spec that starts with '-' ('->kohya') was read by click as a cluster of short
# options ('-h' printed the help, '-r' took 's' as the rank). Each form runs in-process through the click group; one
# of each kind also through the console script and one through `python -m adaptkit`.


@pytest.fixture(scope="module")
def spec_inputs(tmp_path_factory):
    """A PEFT LoRA and a LyCORIS LoHa (bundled, for the tiny llama), that llama's weights, a diffusers LoRA of a
    tiny SD pipeline (made with peft, saved by diffusers), and PiSSA/OLoRA adapter pairs (made with peft)."""
    from adaptkit.demo import build_example_base, example

    from .test_diffusers_format import diffusers_saved
    from .test_reparam import build_case

    root = tmp_path_factory.mktemp("specs")
    (root / "diffusers").mkdir()
    diffusers_saved(root / "diffusers")
    for init in ("pissa", "olora"):
        (root / init).mkdir()
        build_case(root / init, init)
    return {"LORA": str(example("lora_code")), "LOHA": str(example("lycoris_loha.safetensors")),
            "BASE": str(build_example_base(root / "base")), "DIFF": str(root / "diffusers"),
            **{f"{init.upper()}_{part.upper()}": str(root / init / part) for init in ("pissa", "olora")
               for part in ("trained", "init", "peft_converted")}}


# (arguments with placeholders, expected output format, what the output must equal: a source placeholder, or
# None for a lossy conversion checked by its report)
SPECS = [
    (["->kohya", "LORA", "OUT.safetensors"], "kohya", "LORA"),
    (["--overwrite", "->lycoris", "LORA", "OUT.safetensors"], "kohya", "LORA"),  # options before the spec
    (["--json", "->diffusers", "DIFF", "OUT"], "diffusers", "DIFF"),
    (["->peft", "LOHA", "OUT", "--base", "BASE"], "peft", "LOHA"),  # options after the arguments
    (["lycoris->peft", "LOHA", "OUT", "--base", "BASE"], "peft", "LOHA"),
    (["kohya->peft", "LOHA", "OUT", "--kind", "lora", "--json", "--base", "BASE"], "peft", "LOHA"),
    (["peft->kohya", "LORA", "OUT.safetensors"], "kohya", "LORA"),
    (["-r", "4", "->diffusers", "DIFF", "OUT"], "diffusers", "DIFF"),  # a short option, then a spec
    (["LORA", "OUT.safetensors", "--from", "peft", "--to", "kohya"], "kohya", "LORA"),
    (["--to", "lycoris", "LORA", "OUT.safetensors"], "kohya", "LORA"),
    (["pissa->lora", "PISSA_TRAINED", "OUT", "--initial", "PISSA_INIT"], "peft", "PISSA_PEFT_CONVERTED"),
    (["--initial", "OLORA_INIT", "olora->lora", "OLORA_TRAINED", "OUT", "--rank", "3"], "peft", None),
]


def _fill(args: list[str], inputs: dict[str, str], out: Path) -> list[str]:
    return [str(out) + a[3:] if a.startswith("OUT") else inputs.get(a, a) for a in args]


def _deltas_equal(got, want) -> None:
    import torch

    assert set(got.layers) == set(want.layers), sorted(set(got.layers) ^ set(want.layers))[:4]
    for path, layer in want.layers.items():
        d = layer.delta()
        torch.testing.assert_close(got.layers[path].delta(), d, rtol=1e-3, atol=1e-3 * float(d.abs().max()), msg=path)


def _check_spec_run(res, args, fmt, want, inputs, out) -> None:
    import json

    import adaptkit as ak

    assert res.returncode == 0, (args, res.stdout, res.stderr)
    assert "Usage:" not in res.stdout and res.stderr == "", (args, res.stdout, res.stderr)
    target = Path(str(out) + next(a for a in args if a.startswith("OUT"))[3:])
    assert target.exists(), (args, res.stdout)
    got = ak.load(target, base=inputs["BASE"] if fmt == "kohya" else None)
    assert got.format == fmt, (args, got.format)
    if "--json" in args:
        assert json.loads(res.stdout)["to"] == fmt
    if want is not None:
        _deltas_equal(got, ak.load(inputs[want], base=inputs["BASE"] if want == "LOHA" else None))
    else:  # the compressed OLoRA conversion: rank 3, its loss reported per layer
        assert {layer.rank for layer in got.layers.values()} == {3} and "retained_energy" in res.stdout


#: one console-script run per distinct way a spec reaches the parser: a leading '->' spec, one after an option, one
#: after --json, a 'FROM->TO' spec, and no spec at all (--from/--to); every form also runs in-process below
CONSOLE_SPECS = [SPECS[0], SPECS[1], SPECS[2], SPECS[4], SPECS[8]]


@pytest.mark.parametrize("args,fmt,want", CONSOLE_SPECS, ids=[" ".join(a) for a, _, _ in CONSOLE_SPECS])
def test_spec_forms_through_the_console_script(spec_inputs, tmp_path, args, fmt, want):
    script = Path(sys.executable).parent / "adaptkit"
    if not script.exists():
        pytest.skip("the adaptkit console script is not installed next to this interpreter")
    cmd = [str(script), "convert", *_fill(args, spec_inputs, tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=300)
    _check_spec_run(res, args, fmt, want, spec_inputs, tmp_path / "out")


@pytest.mark.parametrize("args,fmt,want", SPECS, ids=[" ".join(a) for a, _, _ in SPECS])
def test_every_documented_spec_in_process(spec_inputs, tmp_path, args, fmt, want):
    """The same argument lists through the same click group (CliRunner): what the console script parses."""
    res = run_cli("convert", *_fill(args, spec_inputs, tmp_path / "out"), cwd=tmp_path)
    _check_spec_run(res, args, fmt, want, spec_inputs, tmp_path / "out")


def test_dash_spec_through_python_dash_m(spec_inputs, tmp_path):
    args, fmt, want = SPECS[0]
    cmd = [sys.executable, "-m", "adaptkit", "convert", *_fill(args, spec_inputs, tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=300)
    _check_spec_run(res, args, fmt, want, spec_inputs, tmp_path / "out")


def test_spec_mistakes_are_usage_errors(tmp_path):
    """A spec in the wrong place or an unknown option: one line, nothing written, no help printed."""
    from adaptkit.demo import example

    src = str(example("lora_code"))
    for args, needle in ((["convert", src, "->kohya", str(tmp_path / "o")], "the spec '->kohya' comes first"),
                         (["convert", "->kohya", src, str(tmp_path / "o"), "--rnak", "2"],
                          "no such option '--rnak'; did you mean --rank?"),
                         (["convert", "->kohya", src], "expected 'FROM->TO' SOURCE OUT")):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and res.stdout == "" and "Usage:" not in res.stderr, (args, res.output)
        assert needle in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    assert not list(tmp_path.iterdir())
