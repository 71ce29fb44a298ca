"""Wan 2.x (``WanTransformer3DModel``): the module map against a tiny I2V-shaped model (image cross-attention and
image MLP present), diffusers' own converters as oracles (``WanPipeline.lora_state_dict`` on ComfyUI-style
``diffusion_model.`` files and on musubi-tuner ``lora_unet_`` files), and bad inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

import adaptkit as ak
from adaptkit.core.coverage import CoverageError
from adaptkit.formats.arch import ARCHS, arch_of_model
from adaptkit.formats.arch.remap import to_namespace

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

# 2 blocks, I2V-shaped (image_dim / added_kv_proj_dim set: k_img, v_img, img_emb exist), tiny dims
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=12, freq_dim=8, ffn_dim=24, num_layers=2, image_dim=10, added_kv_proj_dim=16, rope_max_seq_len=32)
ALPHAS = {"attn1.to_k": 2.0, "ffn.net.2": 6.0, "add_v_proj": 1.0, "attn2.to_v": 3.0, "condition_embedder.time_proj": 5.0}


@pytest.fixture(scope="module")
def base() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY).eval()


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 5, 12, generator=g),
                encoder_hidden_states_image=torch.randn(1, 3, 10, generator=g))


def test_every_linear_and_conv_maps(base):
    wan = ARCHS["wan"]
    assert arch_of_model(base) is wan
    names = weight_modules(base)
    assert "patch_embedding" in names and "blocks.1.attn2.add_k_proj" in names
    missing = [n for n in names if wan.to_original(n) is None]
    assert not missing
    # the original names are diffusers' single-file key map (convert_wan_transformer_to_diffusers)
    assert wan.to_diffusers("blocks.3.cross_attn.k_img")[1] == ("blocks.3.attn2.add_k_proj",)
    assert wan.to_diffusers("blocks.0.norm3")[1] == ("blocks.0.norm2",)
    assert wan.to_diffusers("head.head")[1] == ("proj_out",)


def test_roundtrip_every_module(base, tmp_path):
    peft_model = with_lora(base, weight_modules(base), ALPHAS)
    a = read_peft(peft_model, tmp_path, WanPipeline)
    assert len(a.layers) == len(weight_modules(base))
    orig, worst = roundtrip_check(a, base)
    assert {"unet.patch_embedding", "unet.blocks.1.cross_attn.v_img", "unet.img_emb.proj.3", "unet.head.head",
            "unet.time_projection.1", "unet.text_embedding.2"} <= set(orig.layers)
    print(f"wan round trip: {len(a.layers)} layers, worst MapRow error {worst:.1e}")


def test_comfyui_layout_oracle(base, inputs, tmp_path):
    """``diffusion_model.<original>.lora_A/B`` (+ ``.alpha`` on the blocks; the converter reads no alpha for the
    embedders and head, so their scale is baked into B) through ``WanPipeline.lora_state_dict``. The converter has
    no key for ``patch_embedding`` (a file with one is refused), so this LoRA covers every Linear."""
    linears = [n for n in weight_modules(base) if n != "patch_embedding"]
    peft_model = with_lora(base, linears, ALPHAS)
    a = read_peft(peft_model, tmp_path, WanPipeline)
    orig, _ = to_namespace(a, "original", base=base)
    sd = original_state_dict(orig, "comfyui", bake=("time_", "text_", "img_emb", "head"))
    converted = WanPipeline.lora_state_dict(sd)
    worst = assert_deltas_match(a, converted_deltas(converted))
    err = loaded_outputs_match(peft_model, base, converted, inputs)
    print(f"wan comfyui oracle: {len(converted) // 2} modules, ΔW worst {worst:.1e}, output rel err {err:.1e}")


def test_comfyui_layout_patch_embedding_not_read_by_diffusers(base, tmp_path):
    peft_model = with_lora(base, ["patch_embedding", "blocks.0.attn1.to_q"], {})
    orig, _ = to_namespace(read_peft(peft_model, tmp_path, WanPipeline), "original", base=base)
    with pytest.raises(ValueError, match="patch_embedding"):
        WanPipeline.lora_state_dict(original_state_dict(orig, "comfyui", alphas=False))


def test_musubi_layout_oracle(base, inputs, tmp_path):
    """musubi-tuner's layout (``lora_unet_<flattened original>`` + ``lora_down``/``lora_up`` + ``.alpha``) through
    ``WanPipeline.lora_state_dict``: musubi trains the blocks' Linear layers (its converter reads nothing else)."""
    blocks = [n for n in weight_modules(base) if n.startswith("blocks.")]
    peft_model = with_lora(base, blocks, ALPHAS, seed=3)
    a = read_peft(peft_model, tmp_path, WanPipeline)
    orig, _ = to_namespace(a, "original", base=base)
    sd = original_state_dict(orig, "kohya")
    assert "lora_unet_blocks_1_cross_attn_k_img.lora_down.weight" in sd and "lora_unet_blocks_0_ffn_0.alpha" in sd
    converted = WanPipeline.lora_state_dict(sd)
    worst = assert_deltas_match(a, converted_deltas(converted))
    err = loaded_outputs_match(peft_model, base, converted, inputs)
    print(f"wan musubi oracle: {len(converted) // 2} modules, ΔW worst {worst:.1e}, output rel err {err:.1e}")


def test_unmapped_path_is_a_coverage_error(base, tmp_path):
    a = read_peft(with_lora(base, ["blocks.0.attn1.to_q", "blocks.0.ffn.net.2"], {}), tmp_path, WanPipeline)
    orig, _ = to_namespace(a, "original", base=base)
    bad = orig.replace(layers={**orig.layers, "unet.blocks.0.self_attn.qkv": orig.layers["unet.blocks.0.self_attn.q"]})
    with pytest.raises(CoverageError, match=r"blocks\.0\.self_attn\.qkv"):
        to_namespace(bad, "diffusers", arch="wan", base=base)
    out, _ = to_namespace(bad, "diffusers", arch="wan", base=base, drop="unet.blocks.0.self_attn.qkv")
    assert set(out.layers) == set(a.layers)
    wrong = a.replace(layers={**a.layers, "transformer.blocks.0.attn1.to_qkv": a.layers["transformer.blocks.0.attn1.to_q"]})
    with pytest.raises(CoverageError, match=r"blocks\.0\.attn1\.to_qkv"):
        to_namespace(wrong, "original", arch="wan", base=base)


def test_save_lora_adapter_file_keeps_alphas(base, tmp_path):
    """A bare model's save_lora_adapter file (unprefixed keys and lora_adapter_metadata) keeps its alphas."""
    peft_model = with_lora(base, ["blocks.0.attn1.to_q", "blocks.0.attn1.to_k"], {"attn1.to_k": 2.0})
    peft_model.save_lora_adapter(str(tmp_path))
    a = ak.load(str(tmp_path), format="diffusers")
    assert a.layers["transformer.blocks.0.attn1.to_q"].alpha == 8.0
    assert a.layers["transformer.blocks.0.attn1.to_k"].alpha == 2.0


def test_written_layouts_and_diffusers_reads_them(base, inputs, tmp_path):
    """ak.save as comfyui / kohya (musubi names) / diffusers, read back by ak.load; diffusers' converters read the
    comfyui and musubi files of a block LoRA (what musubi-tuner trains), and load_lora_adapter reads the diffusers
    directory of a LoRA on every Linear/Conv3d, each giving the PEFT model's outputs."""
    blocks = [n for n in weight_modules(base) if n.startswith("blocks.")]
    peft_blocks = with_lora(base, blocks, ALPHAS, seed=5)
    a = read_peft(peft_blocks, tmp_path / "blocks", WanPipeline)
    files, worst = written_layouts(a, base, tmp_path / "out_blocks")
    assert "lora_unet_blocks_1_cross_attn_k_img.alpha" in file_tensors(files["kohya"])
    errs = []
    for layout in ("comfyui", "kohya"):
        converted = WanPipeline.lora_state_dict(file_tensors(files[layout]))
        assert_deltas_match(a, converted_deltas(converted))
        errs.append(loaded_outputs_match(peft_blocks, base, converted, inputs))
    peft_all = with_lora(base, weight_modules(base), ALPHAS, seed=6)
    a_all = read_peft(peft_all, tmp_path / "all", WanPipeline)
    files_all, worst_all = written_layouts(a_all, base, tmp_path / "out_all")
    errs.append(loaded_outputs_match(peft_all, base, str(files_all["diffusers"]), inputs))
    # diffusers' comfyui-layout reader takes no alpha outside the blocks and no patch_embedding key
    with pytest.raises(ValueError, match="should be empty"):
        WanPipeline.lora_state_dict(file_tensors(files_all["comfyui"]))
    print(f"wan written layouts: read-back ΔW worst {max(worst, worst_all):.1e}; diffusers outputs (comfyui, musubi, "
          f"diffusers dir) rel err {', '.join(f'{e:.1e}' for e in errs)}")


# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, Wan-AI/Wan2.2-TI2V-5B-Diffusers and Wan-AI/Wan2.2-I2V-A14B-Diffusers (each
# expert) transformer configs, built on the meta device: the same class and module names as the shipped T2V-14B row
RELEASES = {
    "2.1-I2V-14B": dict(ARCHS["wan"].config, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "2.2-TI2V-5B": dict(ARCHS["wan"].config, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336,
                        num_layers=30),
    "2.2-I2V-A14B": dict(ARCHS["wan"].config, in_channels=36),
}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_released_variants_share_the_map(release):
    with torch.device("meta"):
        model = WanTransformer3DModel(**RELEASES[release])
    weighted = [n for n, m in model.named_modules() if n and isinstance(getattr(m, "weight", None), torch.Tensor)]
    assert not [n for n in weighted if ARCHS["wan"].to_original(n) is None]


def test_shipped_inventory_is_fully_mapped():
    from adaptkit.formats import names

    inv = names.shipped("wan")
    assert len(inv.modules["transformer"]) == len(inv.modules["unet"]) == 607
    assert all(ARCHS["wan"].to_original(p) for p in inv.modules["transformer"])
    assert inv.modules["unet"]["blocks.39.cross_attn.k"] == (5120, 5120)
    assert inv.modules["unet"]["text_embedding.0"] == (5120, 4096)
    assert inv.modules["unet"]["patch_embedding"] == (5120, 16, 1, 2, 2)
