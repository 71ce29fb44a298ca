"""An unreachable hub (no network, not offline mode): one line, within seconds, suggesting ``HF_HUB_OFFLINE=1``.

huggingface_hub retries a failed listing five times with back-off (~30 s, a dozen warning lines). adaptkit asks
the hub once, without retries, before listing; when it does not answer, the local cache is used as offline.
Each case runs in a fresh interpreter with ``HF_HUB_OFFLINE`` unset and ``HF_ENDPOINT`` at a local port that
refuses connections, or that accepts them and never answers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

from .conftest import cli_error, make_hub_cache, make_peft_adapter

_TIMED = """
import json, sys, time
import adaptkit as ak
from adaptkit.io.sources import resolve
out = {}
for name, call in (("load_missing", lambda: ak.load("org/nothere")), ("load_cached", lambda: len(ak.load("org/cached"))),
                   ("resolve_missing", lambda: resolve("org/nothere")), ("resolve_cached", lambda: resolve("org/cached").commit)):
    start = time.perf_counter()
    try:
        result = call()
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    out[name] = [time.perf_counter() - start, result]
print(json.dumps(out))
"""


def _env(cache: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint, **extra}


@pytest.fixture
def cache(tmp_path):
    adapter = make_peft_adapter(tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "org/cached", {"adapter_config.json": adapter / "adapter_config.json",
                                         "adapter_model.safetensors": adapter / "adapter_model.safetensors"})
    return cache


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def _timed(env: dict[str, str]) -> tuple[dict, str]:
    res = subprocess.run([sys.executable, "-c", _TIMED], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def test_refused_connection_is_one_quiet_error_in_seconds(cache, closed_port):
    results, stderr = _timed(_env(cache, f"http://127.0.0.1:{closed_port}"))
    assert stderr == ""  # no retry warnings
    for name in ("load_missing", "resolve_missing"):
        elapsed, message = results[name]
        assert elapsed < 3.0, (name, elapsed)
        assert message.startswith("SourceNotFoundError: 'org/nothere' is not in the local cache and the hub could not "
                                  "be reached: ConnectError"), message
        assert "HF_HUB_OFFLINE=1" in message
    assert results["load_cached"][1] == 2 and results["load_cached"][0] < 3.0
    assert results["resolve_cached"][1] == "0123456789abcdef0123456789abcdef01234567"


def test_refused_connection_in_the_cli(cache, closed_port):
    res = subprocess.run([sys.executable, "-m", "adaptkit.cli", "info", "org/nothere"], capture_output=True, text=True,
                         env=_env(cache, f"http://127.0.0.1:{closed_port}"), timeout=120)
    cli_error(res, "'org/nothere' is not in the local cache and the hub could not be reached", "HF_HUB_OFFLINE=1")
    res = subprocess.run([sys.executable, "-m", "adaptkit.cli", "info", "org/cached"], capture_output=True, text=True,
                         env=_env(cache, f"http://127.0.0.1:{closed_port}"), timeout=120)
    assert res.returncode == 0 and res.stderr == "" and "org/cached@0123456789" in res.stdout


def test_hub_that_never_answers_waits_only_the_probe_limit(cache):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel accepts connections; nobody ever answers
    try:
        env = _env(cache, f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="1")
        results, stderr = _timed(env)
    finally:
        silent.close()
    assert stderr == ""
    # the first call waits for the probe (1 s here, HF_HUB_ETAG_TIMEOUT); the answer is kept for the process
    assert results["load_missing"][0] < 4.0 and "Timeout" in results["load_missing"][1]
    assert max(results[k][0] for k in ("load_cached", "resolve_missing", "resolve_cached")) < 1.0
    assert results["load_cached"][1] == 2
