"""Shared fixtures: tiny seeded models built from configs, and adapters made with the real peft package.

Everything is built locally with random (seeded) weights; nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


def lycoris_network(model, targets=("Linear", "Conv2d"), **kwargs):
    """``create_lycoris(model, 1.0, **kwargs)`` on the module types ``targets`` only, applied to ``model``; lycoris's
    default target preset is restored afterwards (it is global state)."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": list(targets)})
    try:
        net = create_lycoris(model, 1.0, **kwargs)
    finally:
        LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"]})
    net.apply_to()
    return net


def tiny_llama_config(**overrides):
    """A 2-layer llama small enough to build in milliseconds."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with seeded random weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def perturb_saved_copies(peft_model, scale: float = 0.5) -> None:
    """Move a PEFT model's ``modules_to_save`` copies away from the base (seeded by the caller), as training does."""
    with torch.no_grad():
        for module in peft_model.modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                for p in module.modules_to_save["default"].parameters():
                    p.add_(scale * torch.randn_like(p))


def make_peft_adapter(path: Path, peft_config, seed: int = 0, model_seed: int = 0, model=None) -> Path:
    """Create an adapter with real peft on a tiny llama (random, non-zero init) and save it to ``path``."""
    from peft import get_peft_model

    base = model if model is not None else make_tiny_llama(model_seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, peft_config)
    peft_model.save_pretrained(str(path))
    return Path(path)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def input_ids():
    torch.manual_seed(1234)
    return torch.randint(0, 64, (2, 9))


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",),
                   commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """Lay out a local Hugging Face cache holding ``repo_id`` at ``commit``, as huggingface_hub does.

    ``files`` maps a path inside the repo to a local file or directory to copy there. Each name in ``refs``
    (branches/tags) points at the commit. Returns the commit hash.
    """
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        dest = snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy(src, dest)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fresh local HF cache, with huggingface_hub pointed at it and offline (the real code path)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


@dataclass(frozen=True)
class CliRun:
    """What a command line run gave, in the shape of :class:`subprocess.CompletedProcess` (text mode)."""

    returncode: int
    stdout: str
    stderr: str


#: huggingface_hub reads these at import time; an in-process run with them in ``env`` sets the module's copy too
_HUB_CONSTANTS = {"HF_HUB_CACHE": lambda v: v, "HF_HUB_OFFLINE": lambda v: v.lower() in {"1", "true", "yes", "on"}}


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> CliRun:
    """Run ``adaptkit ARGS`` in this process with click's ``CliRunner``: exit code, stdout and stderr apart.

    The same click group as the console script, so parsing, the command and the central error formatting are the
    ones a user runs; only the interpreter start (3-5 s of importing torch) is saved. An exception that escapes the
    CLI's error handling is raised here (a real run would print a traceback), so no test mistakes it for a clean
    ``exit 1``. ``env`` is set for the run (huggingface_hub's cache/offline constants too), ``cwd`` entered, and
    the environment restored afterwards. Tests about the process itself use :func:`run_cli_process`.
    """
    from click.testing import CliRunner

    from adaptkit.cli import main

    saved_env, saved_cwd, saved_constants = dict(os.environ), os.getcwd(), {}
    try:
        if env:
            from huggingface_hub import constants

            for key, convert in _HUB_CONSTANTS.items():
                if key in env:
                    saved_constants[key] = getattr(constants, key)
                    setattr(constants, key, convert(env[key]))
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        if saved_constants:
            from huggingface_hub import constants

            for key, value in saved_constants.items():
                setattr(constants, key, value)
    return CliRun(res.exit_code, res.stdout, res.stderr)


def run_cli_process(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run ``python -m adaptkit.cli ARGS`` in a subprocess; returns the CompletedProcess (text mode).

    For tests about the process: its exit status, what a fresh interpreter prints, signals, resource limits.
    """
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "adaptkit.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


class FakeTTY(io.StringIO):
    """A text stream that says it is a terminal: what an in-process run draws its progress bars on."""

    def isatty(self) -> bool:
        return True


def run_cli_on_tty(monkeypatch, *args: str) -> tuple[CliRun, str]:
    """:func:`run_cli` with adaptkit's progress bars drawn on a :class:`FakeTTY` stderr: ``(run, what it got)``.

    ``adaptkit.progress`` decides "a bar only on a terminal" from its stderr stream; here that stream is a fake
    terminal, so a command's bars (and only its bars) land in the returned text. The real-terminal path (an
    unsized pseudo-terminal) is tested through a pty in ``tests/test_cli_progress.py``.
    """
    import adaptkit.progress

    tty = FakeTTY()
    with monkeypatch.context() as m:
        m.setattr(adaptkit.progress, "_stderr", lambda: tty)
        res = run_cli(*args)
    return res, tty.getvalue()


def cli_error(res, *fragments: str) -> str:
    """Assert a CLI run failed as adaptkit promises (exit 1, one ``error: ...`` line, no traceback) and that the
    line holds every fragment; returns the line."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file (and link target) under ``path``, by relative path: to prove an input was not touched."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    out: dict[str, bytes] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"<dir>"
    return out
