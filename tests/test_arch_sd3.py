"""SD3 / SD3.5: Stability AI's MMDiT names <-> diffusers' ``SD3Transformer2DModel``.

diffusers converts no non-diffusers SD3 LoRA (``SD3LoraLoaderMixin.lora_state_dict`` only drops DoRA scales), so the
oracles are diffusers' checkpoint converter ``convert_sd3_transformer_checkpoint_to_diffusers`` on the dense ΔW in SAI
names (it runs at any size: it reads the depth, ``attn2`` blocks and width from the keys) and ``load_lora_adapter`` of
the diffusers-layout file on a fresh tiny model. The tiny model has 2 joint blocks (block 0 with SD3.5's ``attn2``,
block 1 the last, pre-only one), so its map is ``sd3_rules(2)``; the shipped rows are ``sd3_rules(24)`` / ``(38)``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import adaptkit as ak
from adaptkit.core.kinds import LoRA
from adaptkit.errors import UnsupportedError
from adaptkit.formats import names
from adaptkit.formats.arch import ARCHS, get_arch
from adaptkit.formats.arch.remap import to_namespace
from adaptkit.formats.arch.sd3 import SD3, sd3_rules
from tests.arch_models import (
    SD3_TINY,
    check_round_trip,
    deltas,
    load_written_diffusers,
    make_case,
    max_rel,
    rel,
    report,
    run_model,
    tiny,
    weight_modules,
)

SD3_ROWS = ("sd3", "sd35_medium", "sd35_large")
TINY = dataclasses.replace(SD3, name="sd3_tiny", rules=sd3_rules(2))
ALPHAS = {"transformer_blocks.0.attn.to_k": 2.0, "transformer_blocks.0.attn2.to_v": 16.0,
          "transformer_blocks.1.attn.add_q_proj": 1.0}


def sai_sd3(depth: int = 24) -> dict[str, list[int]]:
    """The SD3-medium SAI module list ``scripts/make_inventories.py`` wrote by hand before the map (a copy)."""
    h = 64 * depth
    mods: dict[str, list[int]] = {
        "x_embedder.proj": [h, 16, 2, 2], "context_embedder": [h, 4096], "t_embedder.mlp.0": [h, 256],
        "t_embedder.mlp.2": [h, h], "y_embedder.mlp.0": [h, 2048], "y_embedder.mlp.2": [h, h],
        "final_layer.linear": [64, h], "final_layer.adaLN_modulation.1": [2 * h, h],
    }
    for i in range(depth):
        for blk in ("x_block", "context_block"):
            pre_only = blk == "context_block" and i == depth - 1
            mods[f"joint_blocks.{i}.{blk}.attn.qkv"] = [3 * h, h]
            mods[f"joint_blocks.{i}.{blk}.adaLN_modulation.1"] = [(2 if pre_only else 6) * h, h]
            if not pre_only:
                mods[f"joint_blocks.{i}.{blk}.attn.proj"] = [h, h]
                mods[f"joint_blocks.{i}.{blk}.mlp.fc1"] = [4 * h, h]
                mods[f"joint_blocks.{i}.{blk}.mlp.fc2"] = [h, 4 * h]
    return mods


def inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))


def run(model):
    return run_model(model, inputs())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case("SD3Transformer2DModel", SD3_TINY, "StableDiffusion3Pipeline", tmp_path_factory.mktemp("sd3"),
                     ALPHAS, arch=TINY)


def test_shipped_sd3_inventory_keeps_the_hand_written_list():
    old = sai_sd3()
    new = names.shipped("sd3").modules["unet"]
    assert {k: list(v) for k, v in new.items()} == old  # 245 modules, same names and shapes


def test_sd35_rows():
    med, large = (names.shipped(n).modules for n in ("sd35_medium", "sd35_large"))
    assert med["unet"]["joint_blocks.12.x_block.attn2.qkv"] == (4608, 1536)
    assert "joint_blocks.13.x_block.attn2.qkv" not in med["unet"]
    assert med["unet"]["joint_blocks.0.x_block.adaLN_modulation.1"] == (9 * 1536, 1536)  # SD35AdaLayerNormZeroX
    assert large["unet"]["joint_blocks.37.context_block.adaLN_modulation.1"] == (2 * 2432, 2432)
    assert "joint_blocks.37.context_block.attn.proj" not in large["unet"]
    assert len(large["unet"]) == 38 * 10 - 3 + 8
    # the last block's text-stream norm swaps (shift, scale); the others do not
    assert ARCHS["sd3"].to_diffusers("joint_blocks.23.context_block.adaLN_modulation.1")[0].swap
    assert not ARCHS["sd35_large"].to_diffusers("joint_blocks.23.context_block.adaLN_modulation.1")[0].swap
    assert ARCHS["sd35_large"].to_diffusers("joint_blocks.37.context_block.adaLN_modulation.1")[0].swap
    assert get_arch("SD3.5-large") is ARCHS["sd35_large"]


@pytest.mark.parametrize("name,width,key", [("sd3", 1536, "joint_blocks.23.context_block.attn.qkv"),
                                            ("sd35_medium", 1536, "joint_blocks.3.x_block.attn2.qkv"),
                                            ("sd35_large", 2432, "joint_blocks.37.context_block.attn.qkv")])
def test_kohya_files_resolve_without_a_base(tmp_path, name, width, key):
    f = tmp_path / "a.safetensors"
    kohya = "lora_unet_" + key.replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": torch.randn(2, width), f"{kohya}.lora_up.weight": torch.randn(3 * width, 2),
               f"{kohya}.alpha": torch.tensor(1.0)}, str(f))
    a = ak.load(f)
    assert a.config["inventory"] == name and f"unet.{key}" in a.layers
    d, rows = to_namespace(a, "diffusers")
    assert len(d.layers) == 3 and max(r.error for r in rows) < 1e-6


def test_every_weight_module_maps():
    model = tiny("SD3Transformer2DModel", SD3_TINY)
    assert not [n for n in weight_modules(model) if TINY.to_original(n) is None]
    for row in SD3_ROWS:  # and every Linear/Conv of the released models
        inv = names.shipped(row).modules["transformer"]
        assert not [p for p, s in inv.items() if len(s) in (2, 4) and ARCHS[row].to_original(p) is None]


def test_round_trip_is_exact(case):
    a, orig, back = case["a"], case["orig"], case["back"]
    assert len(a.layers) == len(weight_modules(case["base"])) == 37
    assert set(back.layers) == set(a.layers)
    assert orig.layers["unet.joint_blocks.0.x_block.attn2.qkv"].rank == 12
    assert "unet.joint_blocks.1.context_block.attn.proj" not in orig.layers
    assert orig.layers["unet.x_embedder.proj"].module_type == "conv"
    check_round_trip(case, "sd3")


def test_checkpoint_converter_oracle(case):
    """diffusers' SD3 checkpoint converter on the dense ΔW in SAI names == adaptkit's diffusers ΔW."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    ckpt = {"pos_embed": torch.zeros(1, 16, 32)}
    for p, layer in case["orig"].layers.items():
        u, v = layer.factors()
        name = p.partition(".")[2]
        ckpt[f"{name}.weight"] = (u @ v).reshape(layer.shape)
        ckpt[f"{name}.bias"] = torch.zeros(layer.shape[0])
    conv = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    got = {k[:-len(".weight")]: v.reshape(v.shape[0], -1) for k, v in conv.items() if k.endswith(".weight")}
    assert report("sd3 checkpoint converter rel dW", max_rel(got, deltas(case["a"], "transformer"))) < 1e-6


def test_diffusers_layout_loads_into_the_tiny_model(case, tmp_path):
    """(ii) the round-tripped adapter as a diffusers file -> StableDiffusion3Pipeline.lora_state_dict (which
    converts nothing) -> load_lora_adapter on a fresh model == the PEFT model (rtol 1e-4)."""
    import diffusers

    state = {}
    for p, layer in case["back"].layers.items():
        state[f"{p}.lora_A.weight"] = layer.down.contiguous()
        state[f"{p}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    read = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(tmp_path))
    assert set(read) == set(state)
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter(read, prefix="transformer", adapter_name="x")
    out, want = run(fresh), run(case["model"])
    assert report("sd3 LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("sd3 (ii) diffusers layout, output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


def test_bad_inputs(case):
    orig = case["orig"]
    extra = LoRA(down=torch.randn(2, 32), up=torch.randn(32, 2), alpha=2.0, shape=(32, 32))
    odd = orig.replace(layers={**orig.layers, "unet.joint_blocks.0.x_block.attn.ln_q": extra})
    with pytest.raises(ak.CoverageError, match="ln_q"):
        to_namespace(odd, "diffusers", arch=TINY, base=case["base"])
    kept, _ = to_namespace(odd, "diffusers", arch=TINY, base=case["base"], drop="*ln_q*")
    assert set(kept.layers) == set(case["a"].layers)
    bad = orig.replace(layers={**orig.layers, "unet.joint_blocks.0.context_block.attn.qkv":
                               LoRA(down=torch.randn(2, 32), up=torch.randn(64, 2), alpha=2.0, shape=(64, 32))})
    with pytest.raises(UnsupportedError, match="context_block.attn.qkv"):
        to_namespace(bad, "diffusers", arch=TINY, base=case["base"])


def test_rows_of_one_class_are_told_apart_by_the_config():
    """A base model of each released SD3 config picks its own row (the last block's swap depends on it)."""
    from diffusers import SD3Transformer2DModel

    from adaptkit.formats.arch import arch_of_model

    for row in SD3_ROWS:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**ARCHS[row].config)
        assert arch_of_model(model) is ARCHS[row]
    h = 2432
    layers = {f"transformer.transformer_blocks.{i}.norm1_context.linear":
              LoRA(down=torch.randn(2, h), up=torch.randn(n * h, 2), alpha=2.0, shape=(n * h, h))
              for i, n in ((23, 6), (37, 2))}
    # (a module Flux.1 has at another width: remap's shape check passes paths a shipped inventory lacks, so with only
    # blocks 23 and 37 the file would fit Flux.1's 19-block map as well)
    layers["transformer.transformer_blocks.0.attn.to_q"] = LoRA(down=torch.randn(2, h), up=torch.randn(h, 2), alpha=2.0,
                                                                shape=(h, h))
    d = ak.Adapter(layers=layers)
    _, rows = to_namespace(d, "original", base=model)  # the SD3.5-large model from the loop
    assert {r.target: r.action for r in rows if "adaLN" in r.target} == {
        "unet.joint_blocks.23.context_block.adaLN_modulation.1": "rename",
        "unet.joint_blocks.37.context_block.adaLN_modulation.1": "swap"}
    _, rows2 = to_namespace(d, "original")  # no base: the shipped inventories' shapes pick sd35_large too
    assert [r.action for r in rows2] == [r.action for r in rows]


def test_public_api_writes_every_layout(case, tmp_path):
    """``ak.save`` to comfyui / kohya (original names) / diffusers, read back by layout detection; the written
    diffusers file loads into the tiny model (diffusers reads no other SD3 layout)."""
    import diffusers
    from safetensors.torch import load_file

    a, orig, base = case["a"], case["orig"], case["base"]
    want_orig = deltas(orig, "unet")
    comfy = ak.save(a, tmp_path / "comfy.safetensors", format="comfyui", arch=TINY, base=base)
    kohya = ak.save(a, tmp_path / "kohya.safetensors", format="kohya", naming="original", arch=TINY, base=base)
    diff = ak.save(orig, tmp_path / "diffusers", format="diffusers", arch=TINY, base=base)
    c, k, d = ak.load(comfy), ak.load(kohya, base=base), ak.load(diff)
    assert (c.format, k.format, d.format) == ("comfyui", "kohya", "diffusers")
    assert report("sd3 e2e comfyui read back rel dW", max_rel(deltas(c, "unet"), want_orig)) < 1e-6
    assert report("sd3 e2e kohya read back rel dW", max_rel(deltas(k, "unet"), want_orig)) < 1e-6
    got = deltas(d, "transformer")
    assert report("sd3 e2e diffusers read back rel dW", max_rel(got, deltas(a, "transformer"))) < 1e-6
    fresh = load_written_diffusers(copy.deepcopy(base), diff, "StableDiffusion3Pipeline")
    out, ref = run(fresh), run(case["model"])
    report("sd3 e2e diffusers file -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    # ai-toolkit: one file, diffusers keys, scales baked (written from the original names: mapped back exactly)
    aitk = ak.save(orig, tmp_path / "aitk.safetensors", format="ai-toolkit", arch=TINY, base=base)
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(diffusers.StableDiffusion3Pipeline.lora_state_dict(load_file(str(aitk))), prefix="transformer",
                            adapter_name="x")
    out = run(fresh)
    report("sd3 e2e ai-toolkit file -> lora_state_dict -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
