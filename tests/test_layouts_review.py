"""Failing tests from the review of e2d70ef..HEAD (issue 16/17): each names a bug a user hits."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit.formats.arch import ARCHS, original_listing
from adaptkit.formats.arch.remap import to_base_names
from adaptkit.formats.registry import detect
from adaptkit.ops.convert import convert_formats

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def test_convert_wan_i2v_adapter_to_comfyui_without_base(tmp_path):
    """ak.save writes it; convert refuses k_img/v_img because the shipped inventory is T2V (ops/convert.py:262)."""
    from tests.arch_models import add_lora
    from tests.test_arch_wan import TINY

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    add_lora(model)
    model.save_lora_adapter(str(tmp_path / "d"))
    out = tmp_path / "o.safetensors"
    convert_formats(tmp_path / "d", out, src_format=None, dst_format="comfyui")
    assert len(ak.load(out).layers) == len(ak.load(tmp_path / "d").layers)


def test_comfyui_does_not_write_sd_unet_layers_in_diffusers_names(tmp_path):
    """ComfyUI maps no diffusion_model.down_blocks... key: an SD1.5/SDXL UNet LoRA written so is silently ignored."""
    k = "lora_unet_input_blocks_4_1_proj_in"
    save_file({f"{k}.lora_down.weight": torch.randn(4, 640), f"{k}.lora_up.weight": torch.randn(640, 4),
               f"{k}.alpha": torch.tensor(4.0)}, tmp_path / "sd.safetensors")
    adapter = ak.load(tmp_path / "sd.safetensors")
    try:
        out = ak.save(adapter, tmp_path / "c.safetensors", format="comfyui")
    except AdaptkitError:  # a clear refusal is a fix too
        return
    keys = load_file(str(out))
    assert not any(key.startswith("diffusion_model.down_blocks.") for key in keys), sorted(keys)


def test_comfyui_file_named_like_diffusers_is_detected(tmp_path):
    """A diffusion_model.* file named pytorch_lora_weights.safetensors: diffusers' bare-file rule claims it too."""
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(4, 3072),
               "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(3072, 4)},
              tmp_path / "pytorch_lora_weights.safetensors")
    assert detect(tmp_path / "pytorch_lora_weights.safetensors") == "comfyui"


def _flux_attention_lora(tmp_path):
    from tests.test_layouts_flux import tiny_flux

    base = tiny_flux()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    model.save_lora_adapter(str(tmp_path / "d"))
    shapes = {n: tuple(m.weight.shape) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    bfl = {k + ".weight": v for k, v in original_listing(ARCHS["flux"], shapes).items()}  # flux1-dev.safetensors keys
    return ak.load(tmp_path / "d"), bfl


def test_fuse_names_an_attention_only_flux_lora_onto_a_bfl_checkpoint(tmp_path):
    """fuse has no --arch, yet the attention-only paths fit flux/chroma/hunyuan_video: ConfigError 'pass --arch'."""
    adapter, bfl = _flux_attention_lora(tmp_path)
    out = to_base_names(adapter, bfl)
    assert all(p.partition(".")[2] in {k[:-7] for k in bfl} for p in out.layers)


def test_fuse_stacks_linear1_without_proj_mlp_by_the_base_rows(tmp_path):
    """The base's single_blocks.N.linear1 has the rows (proj_mlp = total - 3 in); remap._stack_sizes ignores it."""
    adapter, bfl = _flux_attention_lora(tmp_path)
    adapter = adapter.replace(metadata={**adapter.metadata, "adaptkit.arch": "flux"})
    out = to_base_names(adapter, bfl)
    assert "unet.single_blocks.0.linear1" in out.layers or "single_blocks.0.linear1" in out.layers


def test_to_base_names_maps_when_only_some_original_names_coincide():
    """LTX's attention names are the same in both namespaces: one coincidence skips the whole map (remap.py:392)."""
    from adaptkit.core.adapter import Adapter
    from adaptkit.core.kinds import LoRA

    def lora(o, i):
        return LoRA(down=torch.randn(2, i), up=torch.randn(o, 2), alpha=2.0, shape=(o, i), module_type="linear")

    adapter = Adapter(layers={"unet.transformer_blocks.0.attn1.to_q": lora(8, 8), "unet.patchify_proj": lora(8, 4)},
                      metadata={"adaptkit.arch": "ltx_video"})
    shapes = {"transformer.transformer_blocks.0.attn1.to_q.weight": (8, 8), "transformer.proj_in.weight": (8, 4)}
    assert "transformer.proj_in" in to_base_names(adapter, shapes).layers


def test_bare_paths_of_other_models_are_not_taken_for_a_diffusion_transformer():
    from adaptkit.formats.names import bare_component

    assert bare_component(["blocks.0.attn.qkv", "blocks.1.mlp.fc1"]) is None  # a timm ViT
    assert bare_component(["layers.0.self_attn.q_proj"]) is None  # a bare LLM decoder
    assert bare_component(["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"]) == "transformer"  # Wan
    assert bare_component(["layers.0.attn.to_q", "noise_refiner.0.attn.to_k"]) == "transformer"  # Lumina2
