"""Module-name resolution: shipped inventories (SDXL LDM vs diffusers names, SD 1.x, SD3, Flux), ``--base``
from a directory (safetensors headers) or a config (meta device), and what is reported when names do not fit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit.errors import ConfigError, ShapeMismatchError, UnsupportedError
from adaptkit.formats import load, names, save


def lora_file(path, entries: dict[str, tuple[int, int]], rank: int = 2, metadata=None, seed=0):
    """A kohya LoRA file with ``{kohya module name: (out, in)}`` and random factors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in entries.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path), metadata=metadata)
    return path


def test_ldm_aliases_agree_with_diffusers_converter():
    """Every LDM alias maps to the module diffusers' own LDM->diffusers checkpoint converter maps it to."""
    import sys
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import make_inventories as mi

    for name, cfg in (("sd15", mi.SD15_UNET), ("sdxl", mi.SDXL_UNET)):
        aliases = names.shipped(name).aliases["unet"]
        ckpt = {}
        for i, ldm in enumerate(sorted(aliases)):
            ckpt[f"{LDM_UNET_KEY}{ldm}.weight"] = torch.tensor([float(i)])
            ckpt[f"{LDM_UNET_KEY}{ldm}.bias"] = torch.tensor([float(i)])
        with torch.device("meta"):
            config = dict(UNet2DConditionModel(**cfg).config)
        converted = convert_ldm_unet_checkpoint(ckpt, config)
        for i, ldm in enumerate(sorted(aliases)):
            assert converted[aliases[ldm] + ".weight"].item() == i, (name, ldm)


SDXL_LDM = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k": (1280, 2048),
    "lora_unet_output_blocks_0_1_proj_out": (1280, 1280),
    "lora_unet_input_blocks_1_0_emb_layers_1": (320, 1280),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
}
SDXL_DIFFUSERS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_mid_block_attentions_0_transformer_blocks_9_attn2_to_k": (1280, 2048),
    "lora_unet_up_blocks_0_attentions_0_proj_out": (1280, 1280),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": (320, 1280),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
}


def test_sdxl_ldm_and_diffusers_names_resolve_to_the_same_modules(tmp_path):
    a = load(lora_file(tmp_path / "ldm.safetensors", SDXL_LDM, metadata={"ss_base_model_version": "sdxl_base_v1-0"}))
    b = load(lora_file(tmp_path / "dif.safetensors", SDXL_DIFFUSERS))
    assert set(a.layers) == set(b.layers)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in a.layers
    assert a.config["inventory"] == "sdxl" and a.config["kohya_naming"]["unet"] == "ldm"
    for p in a.layers:
        torch.testing.assert_close(a[p].delta(), b[p].delta())
    # each file is written back with its own naming, tensors exact
    for src, adapter in (("ldm", a), ("dif", b)):
        out = save(adapter, tmp_path / f"{src}-out.safetensors", format="kohya")
        orig, again = load_file(str(tmp_path / f"{src}.safetensors")), load_file(str(out))
        assert set(orig) == set(again) and all(torch.equal(orig[k], again[k]) for k in orig)
    # and via diffusers: the SDXL metadata brings the LDM names back
    d = save(a, tmp_path / "diffusers", format="diffusers")
    back = save(load(d), tmp_path / "back.safetensors", format="kohya")
    assert set(load_file(str(back))) == set(load_file(str(tmp_path / "ldm.safetensors")))


def test_naming_survives_peft_and_convert(tmp_path):
    """LDM UNet names without SDXL metadata: kohya -> PEFT -> kohya and ak.convert -> kohya keep the names."""
    import adaptkit as ak

    src = lora_file(tmp_path / "ldm.safetensors", SDXL_LDM)
    a = load(src)
    assert a.config["kohya_naming"]["unet"] == "ldm"
    back = save(load(save(a, tmp_path / "peft", format="peft")), tmp_path / "back.safetensors", format="kohya")
    assert set(load_file(str(back))) == set(load_file(str(src)))
    again = save(ak.convert(a, kind="lora", rank=1), tmp_path / "again.safetensors", format="kohya")
    assert set(load_file(str(again))) == set(load_file(str(src)))


def test_sd15_sd3_flux_names(tmp_path):
    sd15 = load(lora_file(tmp_path / "a.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": (768, 3072)}))
    assert sd15.config["inventory"] == "sd15"
    flux = load(lora_file(tmp_path / "b.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_37_linear2": (3072, 15360),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (768, 768)}))
    assert flux.config["inventory"] == "flux" and "unet.single_blocks.37.linear2" in flux.layers
    flux_d = load(lora_file(tmp_path / "c.safetensors", {
        "lora_transformer_single_transformer_blocks_0_attn_to_q": (3072, 3072),
        "lora_transformer_transformer_blocks_18_ff_context_net_2": (3072, 12288)}))
    assert "transformer.transformer_blocks.18.ff_context.net.2" in flux_d.layers
    sd3 = load(lora_file(tmp_path / "d.safetensors", {
        "lora_unet_joint_blocks_23_context_block_attn_qkv": (4608, 1536),
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0": (10240, 4096)}))
    assert sd3.config["inventory"] == "sd3"


def test_unresolvable_names_are_listed(tmp_path):
    entries = dict(SDXL_DIFFUSERS)
    entries["lora_unet_down_blocks_9_attentions_0_proj_in"] = (640, 640)
    with pytest.raises(ConfigError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        load(lora_file(tmp_path / "x.safetensors", entries))
    # right names, wrong shapes: no shipped inventory fits
    with pytest.raises(ConfigError, match="base"):
        load(lora_file(tmp_path / "y.safetensors", {"lora_unet_down_blocks_1_attentions_0_proj_in": (7, 7)}))


def test_base_from_safetensors_headers_and_from_config(tmp_path, tiny_llama):
    model = tiny_llama(0)
    model.save_pretrained(str(tmp_path / "weights"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text((tmp_path / "weights" / "config.json").read_text())
    f = lora_file(tmp_path / "l.safetensors", {"lycoris_model_layers_1_self_attn_q_proj": (32, 32),
                                               "lycoris_model_layers_0_mlp_down_proj": (32, 48)})
    with pytest.raises(ConfigError, match="base"):
        load(f)
    a = load(f, base=str(tmp_path / "weights"))
    b = load(f, base=str(tmp_path / "config"))  # meta-device build: no weights read
    assert set(a.layers) == set(b.layers) == {"model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    bad = lora_file(tmp_path / "bad.safetensors", {"lycoris_model_layers_0_mlp_down_proj": (48, 32)})
    with pytest.raises(ShapeMismatchError, match="down_proj"):
        load(bad, base=str(tmp_path / "weights"))


def test_text_model_names_round_trip(tmp_path):
    """Real kohya files name CLIP modules ``text_model_encoder_...``; they resolve and are written back alike."""
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16))
    te.save_pretrained(str(tmp_path / "base" / "text_encoder"))
    (tmp_path / "base" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    f = lora_file(tmp_path / "k.safetensors", {"lora_te_text_model_encoder_layers_1_mlp_fc1": (24, 16)})
    a = load(f, base=str(tmp_path / "base"))
    assert len(a.layers) == 1 and next(iter(a.layers)).startswith("text_encoder.")
    out = save(a, tmp_path / "o.safetensors", format="kohya")
    assert set(load_file(str(out))) == set(load_file(str(f)))


def test_original_flux_names_are_written_as_diffusers_by_splitting_qkv(tmp_path):
    # one img_attn_qkv key fits Flux.1 and HunyuanVideo (same flattened name and shape): the base names the model
    flux = load(lora_file(tmp_path / "f.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072)}, rank=1),
                base="flux")
    out = load(save(flux, tmp_path / "d", format="diffusers"))
    layer = flux.layers["unet.double_blocks.0.img_attn.qkv"]
    for k, name in enumerate(("to_q", "to_k", "to_v")):
        got = out.layers[f"transformer.transformer_blocks.0.attn.{name}"]
        torch.testing.assert_close(got.delta_math(), layer.delta_math()[3072 * k:3072 * (k + 1)], rtol=0, atol=0)
    save(flux, tmp_path / "k.safetensors", format="kohya")
    assert set(load_file(str(tmp_path / "k.safetensors"))) == set(load_file(str(tmp_path / "f.safetensors")))


def test_bundled_lycoris_example(tmp_path):
    from adaptkit.demo import build_example_base, example
    from adaptkit.ops.convert import convert_checkpoint

    path = example("lycoris_loha.safetensors")
    assert path.stat().st_size < 200_000
    base = build_example_base(tmp_path / "base")
    result = convert_checkpoint("lycoris->peft", path, tmp_path / "peft", base=str(base))
    assert result.lossless and len(result.report) == 14
    assert load(tmp_path / "peft").kinds == {"loha"}


def test_base_as_hub_id_reads_configs_only(tmp_path, hub_cache):
    """A hub pipeline given as --base: only the config files are needed (models built on the meta device)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .conftest import make_hub_cache

    repo = tmp_path / "repo"
    (repo / "unet").mkdir(parents=True)
    (repo / "text_encoder").mkdir()
    unet_cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
                    norm_num_groups=4)
    with torch.device("meta"):
        UNet2DConditionModel(**unet_cfg).save_config(str(repo / "unet"))
    te_cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    te_cfg.architectures = ["CLIPTextModel"]
    te_cfg.save_pretrained(str(repo / "text_encoder"))
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    make_hub_cache(hub_cache, "tiny/sd-pipe", {"model_index.json": repo / "model_index.json", "unet": repo / "unet",
                                               "text_encoder": repo / "text_encoder"})
    f = lora_file(tmp_path / "k.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (8, 16),
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (16, 16)}, rank=1)
    a = load(f, base="tiny/sd-pipe")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in a.layers
    assert any(p.startswith("text_encoder.") and p.endswith("layers.1.self_attn.out_proj") for p in a.layers)


def test_base_as_single_file_ldm_checkpoint(tmp_path):
    """An original SDXL single-file checkpoint as --base: LDM and diffusers kohya names both resolve (header only)."""
    inv = names.shipped("sdxl")
    keep = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.attentions.0.proj_out"]
    ldm_of = {p: a for a, p in inv.aliases["unet"].items()}
    header = {f"model.diffusion_model.{ldm_of[p]}.weight": torch.zeros(4, 4) for p in keep}
    header["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    header["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(12, 4)
    save_file(header, str(tmp_path / "sd_xl_base.safetensors"))
    a = load(lora_file(tmp_path / "a.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (4, 4),
        "lora_unet_up_blocks_0_attentions_0_proj_out": (4, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, 4)}, rank=1), base=str(tmp_path / "sd_xl_base.safetensors"))
    assert set(a.layers) >= {f"unet.{p}" for p in keep}
    assert any(p.startswith("text_encoder.") for p in a.layers)


def test_linear_factors_for_a_1x1_conv_take_the_base_shape(tmp_path):
    """SD 1.x ``proj_in`` is a 1x1 conv; a LoRA stored with 2-D factors is reshaped to the module's layout."""
    a = load(lora_file(tmp_path / "a.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320)}))
    layer = a["unet.down_blocks.0.attentions.0.proj_in"]
    assert layer.shape == (320, 320, 1, 1) and layer.down.shape == (2, 320, 1, 1) and layer.module_type == "conv"
