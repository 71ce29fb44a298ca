"""Qwen-Image (``QwenImageTransformer2DModel``): its original names are diffusers' names, so the map is the identity
and only the file prefixes differ; diffusers' ``_convert_non_diffusers_qwen_lora_to_diffusers`` (through
``QwenImagePipeline.lora_state_dict``) is the oracle for the ComfyUI (``diffusion_model.``) and kohya/musubi
(``lora_unet_`` + flattened names + ``.alpha``) layouts."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from adaptkit.core.coverage import CoverageError
from adaptkit.errors import ConfigError
from adaptkit.formats.arch import ARCHS, arch_of_model
from adaptkit.formats.arch.remap import pick_arch, to_namespace

from .arch_b_helpers import (
    assert_deltas_match,
    converted_deltas,
    file_tensors,
    loaded_outputs_match,
    original_state_dict,
    read_peft,
    roundtrip_check,
    weight_modules,
    with_lora,
    written_layouts,
)

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=12, axes_dims_rope=(4, 6, 6))
ALPHAS = {"attn.to_k": 2.0, "img_mod.1": 3.0, "txt_mlp.net.2": 12.0, "norm_out.linear": 1.0, "img_in": 5.0}


@pytest.fixture(scope="module")
def base() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TINY).eval()


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 12, generator=g),
                encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.5]), img_shapes=[[(1, 2, 2)]])


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    peft_model = with_lora(base, weight_modules(base), ALPHAS)
    return peft_model, read_peft(peft_model, tmp_path_factory.mktemp("qwen"), QwenImagePipeline)


def test_every_linear_maps_to_itself(base):
    qwen = ARCHS["qwen_image"]
    assert arch_of_model(base) is qwen
    names = weight_modules(base)
    assert {"img_in", "txt_in", "norm_out.linear", "transformer_blocks.1.attn.to_add_out"} <= set(names)
    for n in names:
        hit = qwen.to_original(n)
        assert hit is not None and hit[1] == n, n


def test_roundtrip_every_module(base, lora):
    _, a = lora
    assert len(a.layers) == len(weight_modules(base))
    orig, worst = roundtrip_check(a, base)
    assert {p.removeprefix("unet.") for p in orig.layers} == {p.removeprefix("transformer.") for p in a.layers}
    print(f"qwen round trip: {len(a.layers)} layers, worst MapRow error {worst:.1e}")


@pytest.mark.parametrize("style", ["comfyui", "kohya"])
def test_layout_oracle(base, inputs, lora, style):
    peft_model, a = lora
    orig, _ = to_namespace(a, "original", base=base)
    sd = original_state_dict(orig, style)
    if style == "kohya":
        assert "lora_unet_transformer_blocks_1_attn_to_add_out.lora_down.weight" in sd
        assert "lora_unet_time_text_embed_timestep_embedder_linear_1.alpha" in sd
    converted = QwenImagePipeline.lora_state_dict(sd)
    worst = assert_deltas_match(a, converted_deltas(converted))
    err = loaded_outputs_match(peft_model, base, converted, inputs)
    print(f"qwen {style} oracle: {len(converted) // 2} modules, ΔW worst {worst:.1e}, output rel err {err:.1e}")


def test_unmapped_path_is_a_coverage_error(base, lora):
    _, a = lora
    orig, _ = to_namespace(a, "original", base=base)
    one = orig.layers["unet.transformer_blocks.0.attn.to_q"]
    bad = orig.replace(layers={**orig.layers, "unet.transformer_blocks.0.attn.qkv": one})
    with pytest.raises(CoverageError, match=r"transformer_blocks\.0\.attn\.qkv"):
        to_namespace(bad, "diffusers", arch="qwen_image", base=base)
    out, _ = to_namespace(bad, "diffusers", arch="qwen_image", base=base, drop="unet.transformer_blocks.0.attn.qkv")
    assert set(out.layers) == set(a.layers)


def test_rules_do_not_claim_other_architectures(lora):
    """Named rules (not one ``{path}`` rule): Flux's original names are not Qwen-Image paths, so detection from the
    paths still finds Flux alone."""
    _, a = lora
    one = a.layers["transformer.transformer_blocks.0.attn.to_q"]
    flux_like = a.replace(layers={"unet.double_blocks.0.img_attn.proj": one}, metadata={}, config={})
    assert pick_arch(flux_like, "diffusers") is ARCHS["flux"]
    assert ARCHS["qwen_image"].to_diffusers("double_blocks.0.img_attn.proj") is None
    # an attention-only diffusers LoRA is a genuine Flux / Qwen-Image ambiguity: an error naming both
    attn_only = a.replace(layers={"transformer.transformer_blocks.0.attn.to_q": one}, metadata={}, config={})
    with pytest.raises(ConfigError, match=r"flux, .*qwen_image"):
        pick_arch(attn_only, "original")
    assert pick_arch(attn_only, "original", arch="qwen_image") is ARCHS["qwen_image"]


def test_written_layouts_and_diffusers_reads_them(base, inputs, lora, tmp_path):
    """ak.save as comfyui / kohya (original names) / diffusers, read back by ak.load; diffusers reads all three
    (QwenImagePipeline.lora_state_dict for the two single files, load_lora_adapter for the directory) and each gives
    the PEFT model's outputs."""
    peft_model, a = lora
    files, worst = written_layouts(a, base, tmp_path)
    assert "lora_unet_transformer_blocks_0_img_mlp_net_0_proj.alpha" in file_tensors(files["kohya"])
    errs = []
    for layout in ("comfyui", "kohya"):
        converted = QwenImagePipeline.lora_state_dict(file_tensors(files[layout]))
        assert_deltas_match(a, converted_deltas(converted))
        errs.append(loaded_outputs_match(peft_model, base, converted, inputs))
    errs.append(loaded_outputs_match(peft_model, base, str(files["diffusers"]), inputs))
    print(f"qwen written layouts: read-back ΔW worst {worst:.1e}; diffusers outputs (comfyui, kohya, diffusers dir) "
          f"rel err {', '.join(f'{e:.1e}' for e in errs)}")


def test_shipped_inventory_is_fully_mapped():
    from adaptkit.formats import names

    inv = names.shipped("qwen_image")
    assert inv.modules["unet"] == inv.modules["transformer"]  # identical names and shapes
    assert len(inv.modules["transformer"]) == 1087
    assert inv.modules["unet"]["transformer_blocks.59.img_mod.1"] == (6 * 3072, 3072)
    assert inv.modules["unet"]["txt_in"] == (3072, 3584)
