"""The diffusers target: a pipeline adapter diffusers accepts (rank/alpha patterns, conv LoRA) passes as it is; an
rsLoRA one (which diffusers' ``get_peft_kwargs`` would scale by ``alpha / r``) is exported with the scale baked
into B, and ``pipe.load_lora_weights`` of the export gives the adapter's own outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adaptkit import load
from adaptkit.deploy import check, export
from tests.test_diffusers_format import (
    diffusers_saved,
    fused,
    outputs,
    tiny_pipe,
    tiny_te,
    tiny_unet,
)

pytest.importorskip("diffusers")


def test_diffusers_accepts_patterns_and_conv_but_vllm_refuses_conv(tmp_path):
    src, _ = diffusers_saved(tmp_path / "src")
    assert check(src, target="diffusers").ok
    assert "vllm.module_type" in [f.rule for f in check(src, target="vllm").findings]


def test_rslora_is_baked_for_diffusers_and_the_pipeline_gives_the_same_outputs(tmp_path):
    src, _ = diffusers_saved(tmp_path / "src")
    adapter = load(src)
    adapter = adapter.replace(layers={p: dataclasses.replace(l, rslora=True) for p, l in adapter.layers.items()})
    report = check(adapter, target="diffusers")
    assert [f.rule for f in report.findings if f.blocking] == ["diffusers.rslora"]
    result = export(adapter, tmp_path / "out", target="diffusers")
    assert result.check.ok and {r.fix for r in result.fixes} == {"bake_scale"}
    want = outputs(*fused(adapter, tiny_unet(), tiny_te()))
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(tmp_path / "out"))
    for got, exp in zip(outputs(pipe.unet, pipe.text_encoder), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
