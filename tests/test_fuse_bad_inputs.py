"""fuse / unfuse given arguments or adapters they cannot honour: one clear error, exit code 1, nothing written.

Attacked here: the ``workers`` argument, and adapters whose bias part the base has nowhere to put (a PEFT
``lora_bias`` adapter fused into a bias-free base; peft's own ``merge_and_unload`` refuses it as well).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel

import adaptkit as ak
from adaptkit.errors import ConfigError, UnsupportedError

from .conftest import make_peft_adapter, make_tiny_llama, run_cli


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny llama without biases (attention_bias=False, the default), saved as safetensors."""
    path = tmp_path_factory.mktemp("base") / "llama"
    make_tiny_llama(0).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    return make_peft_adapter(tmp_path_factory.mktemp("lora") / "a", cfg, seed=1)


@pytest.mark.parametrize("workers", [0, -3, 2.5, True])
def test_workers_must_be_a_positive_whole_number(tmp_path, llama_dir, lora_dir, workers):
    for func in (ak.fuse, ak.unfuse):
        with pytest.raises(ConfigError, match=r"workers .*at least 1") as e:
            func(llama_dir, lora_dir, tmp_path / "out", workers=workers, progress=False)
        assert repr(workers) in str(e.value)
        # refused before any work, also for a dry run
        with pytest.raises(ConfigError, match="workers"):
            func(llama_dir, lora_dir, None, workers=workers, dry_run=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_workers_out_of_range(tmp_path, llama_dir, lora_dir, value):
    for command in ("fuse", "unfuse"):
        r = run_cli(command, str(llama_dir), str(lora_dir), "-o", str(tmp_path / "out"), "--workers", value)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "--workers" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_lora_bias_into_a_bias_free_base_says_what_is_missing(tmp_path, llama_dir, input_ids):
    """PEFT lora_bias=True made on this very base (peft warns then that merging will be impossible)."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter_dir = make_peft_adapter(tmp_path / "a", cfg, seed=2)
    assert ak.load(adapter_dir).layers["model.layers.0.self_attn.q_proj"].bias is not None
    # the oracle: peft creates no bias either, its merge refuses
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(adapter_dir)).eval()
    with torch.no_grad():
        want = peft_model(input_ids).logits
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        peft_model.merge_and_unload()

    with pytest.raises(UnsupportedError) as e:
        ak.fuse(llama_dir, adapter_dir, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "does not belong" not in msg
    assert "4 of 4 adapter layers would not land" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "'model.layers.0.self_attn.q_proj.weight' has no bias" in msg
    assert "lora_bias" in msg and "ak.inject" in msg
    with pytest.raises(UnsupportedError, match="that have none"):
        ak.fuse(llama_dir, adapter_dir, None, dry_run=True)
    with pytest.raises(UnsupportedError, match="that have none"):
        ak.unfuse(llama_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    r = run_cli("fuse", str(llama_dir), str(adapter_dir), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "that have none" in r.stderr and not (tmp_path / "out").exists()

    # the ways out the message names: a copy without the biases fuses (the weights only) ...
    import dataclasses

    a = ak.load(adapter_dir)
    weights_only = a.replace(layers={p: dataclasses.replace(l, bias=None) for p, l in a.layers.items()})
    assert ak.fuse(llama_dir, weights_only, tmp_path / "w", progress=False).touched == 4
    # ... and the adapter at runtime gives peft's unmerged outputs
    model = make_tiny_llama(0)
    ak.inject(model, adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-4, atol=1e-5)
