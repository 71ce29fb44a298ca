"""Bad inputs: each gives one clear error (exit code 1 in the CLI) and leaves nothing behind.

Bad configs, tensors and arguments are here; corrupt files and disk errors are in test_bad_files.py, bad paths
(subfolders, outputs that are inputs, symlinks, existing outputs) in test_bad_paths.py, an unreachable hub in
test_bad_sources_hub.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import adaptkit as ak

from .conftest import make_peft_adapter, run_cli


@pytest.fixture
def adapter_dir(tmp_path):
    return make_peft_adapter(tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False), seed=3)


def _cli_fails(path, *extra, match):
    res = run_cli("info", str(path), *extra)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_missing_config(adapter_dir):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(ak.ConfigError, match="adapter_config.json is missing"):
        ak.load(adapter_dir / "adapter_model.safetensors")
    _cli_fails(adapter_dir / "adapter_model.safetensors", match="adapter_config.json is missing")


def test_unknown_peft_type(adapter_dir):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["peft_type"] = "FANCY_NEW_METHOD"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ak.ConfigError, match="unknown peft_type 'FANCY_NEW_METHOD'"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="FANCY_NEW_METHOD")


def test_a_b_rank_mismatch(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key][:, :3].contiguous()
    save_file(t, str(f))
    with pytest.raises(ak.ShapeMismatchError, match="rank"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="rank")


def test_one_dimensional_factor(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key] = t[key].flatten().contiguous()  # no shape can be derived from a 1-D factor
    save_file(t, str(f))
    with pytest.raises(ak.ShapeMismatchError, match=r"tensor 'lora_A.weight' has shape \(\d+,\)"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="at least 2 dimensions")


def test_config_contradicts_tensors(adapter_dir):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["r"] = 16
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ak.ConfigError, match="r=16"):
        ak.load(adapter_dir)
    cfg["r"] = 4
    cfg["use_dora"] = True
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ak.ConfigError, match="use_dora"):
        ak.load(adapter_dir)


def test_nan_is_reported(adapter_dir):
    f = adapter_dir / "adapter_model.safetensors"
    t = load_file(str(f))
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, str(f))
    a = ak.load(adapter_dir)
    assert not a.is_finite()
    res = run_cli("info", str(adapter_dir), "--json")
    payload = json.loads(res.stdout)
    assert payload["finite"] is False
    assert sum(not row["finite"] for row in payload["layers"]) == 1


def test_unknown_keys_are_carried_through(adapter_dir, tmp_path):
    f = adapter_dir / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.some.custom.tensor"] = torch.arange(3.0)
    save_file(t, str(f), metadata={"format": "pt", "note": "kept"})
    a = ak.load(adapter_dir)
    assert torch.equal(a.extras["some.custom.tensor"], torch.arange(3.0))
    out = ak.save(a, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as g:
        assert g.metadata()["note"] == "kept"
        assert torch.equal(g.get_tensor("base_model.model.some.custom.tensor"), torch.arange(3.0))


def test_missing_source_and_bad_format_name(tmp_path):
    with pytest.raises(ak.SourceNotFoundError):
        ak.load(tmp_path / "nope")
    with pytest.raises(ak.ConfigError, match="unknown format 'bogus'"):
        ak.load(tmp_path, format="bogus")
    with pytest.raises(ak.FormatError, match="not a recognised adapter"):
        ak.load(tmp_path)


def test_peft_dir_without_config_or_with_subfolder_adapters_only(adapter_dir, tmp_path):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(ak.ConfigError, match="adapter_config.json is missing"):
        ak.load(adapter_dir)
    _cli_fails(adapter_dir, match="adapter_config.json is missing")
    from peft import get_peft_model

    from .conftest import make_tiny_llama

    pm = get_peft_model(make_tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    pm.save_pretrained(str(tmp_path / "only_other"), selected_adapters=["other"])
    line = _cli_fails(tmp_path / "only_other", match="subfolders ['other']")
    assert f"{tmp_path / 'only_other'}:other" in line


def test_save_needs_an_adapter(tmp_path):
    for thing in ({"x": 1}, "adapter_dir", None):
        with pytest.raises(ak.AdaptkitError, match=r"save needs an Adapter, got \w+; load or build one first") as e:
            ak.save(thing, tmp_path / "out")
        assert isinstance(e.value, TypeError)
    assert not (tmp_path / "out").exists()
