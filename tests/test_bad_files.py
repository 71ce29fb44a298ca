"""Bad files and bad disks: corrupt or hostile safetensors headers, pickles that would run code, and writes that
meet a full disk, a file-size limit or a read-only target. Each is one clear error (exit code 1 and one line in
the CLI) naming the file, and nothing is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import LoraConfig
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.errors import OutputWriteError

from .conftest import cli_error, make_peft_adapter, make_tiny_llama, run_cli


@pytest.fixture
def adapter_dir(tmp_path):
    return make_peft_adapter(tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False), seed=3)


def _cli_fails(path, *extra, match):
    return cli_error(run_cli("info", str(path), *extra), match)


def _no_leftovers(directory):
    assert not [p for p in Path(directory).rglob("*") if "adaptkit-tmp" in p.name or "adaptkit-old" in p.name]


def _with_header(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ------------------------------------------------------------------------------- headers


def test_truncated_safetensors(adapter_dir, tmp_path):
    f = adapter_dir / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ak.FormatError, match="truncated"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="truncated")
    f.write_bytes(data[:5])
    with pytest.raises(ak.FormatError, match="not a safetensors file"):
        ak.load(adapter_dir)


def test_header_lies_about_sizes(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 2 for s in header[key]["shape"]]
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ak.FormatError, match="lies about its size"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="lies about its size")


def test_corrupt_header_json(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(ak.FormatError, match="corrupt"):
        ak.load(adapter_dir)


def test_deeply_nested_header_is_a_format_error_at_once(tmp_path):
    for n in (100_000, 5_000_000):
        bomb = _with_header(tmp_path / f"bomb{n}.safetensors", b"[" * n)
        start = time.perf_counter()
        with pytest.raises(ak.FormatError, match="nested too deeply"):
            ak.load(bomb)
        assert time.perf_counter() - start < 1.0
    _cli_fails(tmp_path / "bomb100000.safetensors", match="bomb100000.safetensors has a corrupt safetensors header")


@pytest.mark.parametrize("offsets", [[-4, 0], [8, 4], [0, 4.0], [0, True]])
def test_bad_data_offsets_are_named(tmp_path, offsets):
    f = _with_header(tmp_path / "bad.safetensors",
                     {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}, b"\0" * 16)
    with pytest.raises(ak.FormatError, match=r"data_offsets .*must be two integers 0 <= begin <= end") as e:
        ak.load(f)
    assert "lies about its size" not in str(e.value)
    if offsets == [-4, 0]:
        _cli_fails(f, match="tensor 'lora_unet_x.lora_down.weight' has data_offsets [-4, 0]")


def test_negative_shape_is_named(tmp_path):
    # -1 x -4 floats "need" 16 bytes: sizes that multiply out must still each be >= 0
    f = _with_header(tmp_path / "neg.safetensors",
                     {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}},
                     b"\0" * 16)
    with pytest.raises(ak.FormatError, match=r"has shape \[-1, -4\]; sizes must be integers >= 0"):
        ak.load(f)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bin_never_runs_code(adapter_dir, tmp_path):
    marker = tmp_path / "pwned"
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_model.safetensors").unlink()
    payload = dict(tensors)
    payload["evil"] = _Evil(marker)
    with open(adapter_dir / "adapter_model.bin", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(ak.FormatError, match="refusing to load adapter_model.bin"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="refusing to load")
    assert not marker.exists()


# ------------------------------------------------------------------------------- disks


@pytest.fixture
def fuse_inputs(tmp_path):
    base = tmp_path / "base"
    make_tiny_llama(0).save_pretrained(str(base))  # ~110 KB of float32 weights
    lora = make_peft_adapter(tmp_path / "lora", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    return base, lora


def _limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with a file-size limit of ``limit`` bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ)."""
    import resource

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, preexec_fn=preexec,
                          timeout=300)


def test_file_size_limit_is_one_error_naming_the_output(tmp_path, fuse_inputs, adapter_dir):
    base, lora = fuse_inputs
    out = tmp_path / "fused"
    line = cli_error(_limited(32_000, "-m", "adaptkit.cli", "fuse", str(base), str(lora), "-o", str(out)),
                     f"could not write {out}:", "file-size limit", "EFBIG", "nothing was written")
    assert "adaptkit-tmp" not in line and not out.exists()
    # the adapter writers (safetensors serialised by adaptkit, written by Python) report the same
    saved = tmp_path / "saved"
    res = _limited(2_000, "-c", f"import adaptkit as ak; ak.save(ak.load({str(adapter_dir)!r}), {str(saved)!r})")
    assert res.returncode == 1
    assert f"adaptkit.errors.OutputWriteError: could not write {saved}:" in res.stderr
    assert not saved.exists()
    _no_leftovers(tmp_path)


def _raise_on(call, code, when=lambda *a: True):
    def fake(*args, **kwargs):
        if when(*args):
            raise OSError(code, os.strerror(code))
        return call(*args, **kwargs)

    return fake


def test_disk_full_is_one_error_naming_the_output(tmp_path, monkeypatch, fuse_inputs):
    from click.testing import CliRunner

    from adaptkit.cli import main

    base, lora = fuse_inputs
    out = tmp_path / "fused"
    monkeypatch.setattr(os, "pwrite", _raise_on(os.pwrite, errno.ENOSPC))  # the fuse writer's data writes
    with pytest.raises(OutputWriteError, match=f"could not write {out}: the disk is full") as e:
        ak.fuse(base, [lora], out=out)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert "adaptkit-tmp" not in str(e.value) and not out.exists()
    res = CliRunner().invoke(main, ["fuse", str(base), str(lora), "-o", str(out)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"error: could not write {out}: the disk is full (no space left on device) [ENOSPC]; free space there or "
        "choose an output on another disk (nothing was written)"]
    _no_leftovers(tmp_path)


def test_read_only_target_is_one_error_naming_the_output(tmp_path, monkeypatch, adapter_dir):
    from click.testing import CliRunner

    from adaptkit.cli import main

    a = ak.load(adapter_dir)
    out = tmp_path / "ro" / "out"
    out.parent.mkdir()
    # chmod does not stop root, so the read-only file system is simulated where it bites: creating the temporary
    for call in ("mkdir", "open"):
        monkeypatch.setattr(os, call, _raise_on(getattr(os, call), errno.EROFS, lambda p, *a: "adaptkit-tmp" in str(p)))
    for fmt, target in (("peft", out), ("kohya", out.with_suffix(".safetensors"))):
        with pytest.raises(OutputWriteError, match=f"could not write {target}: the file system is read-only") as e:
            ak.save(a, target, format=fmt)
        assert e.value.errno == errno.EROFS
    res = CliRunner().invoke(main, ["convert", str(adapter_dir), str(out), "--to", "peft"])
    assert res.exit_code == 1 and res.output.startswith(f"error: could not write {out}: the file system is read-only")
    assert len(res.output.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []


def test_permission_errors_on_inputs_are_not_called_write_errors(tmp_path, monkeypatch, fuse_inputs):
    """A guard on the translation above: an input that cannot be read is not reported as a write error."""
    base, lora = fuse_inputs
    shard = str(base / "model.safetensors")
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path) == shard:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(PermissionError) as e:
        ak.fuse(base, [lora], out=tmp_path / "fused")
    assert not isinstance(e.value, OutputWriteError) and str(e.value.filename) == shard
    _no_leftovers(tmp_path)
