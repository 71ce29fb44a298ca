"""Lumina-Image 2.0 (``Lumina2Transformer2DModel``): the packed ``attention.qkv`` (grouped-query: q has more rows
than k and v) stacked from and split into ``to_q``/``to_k``/``to_v`` exactly, per-slice alphas included; diffusers'
``_convert_non_diffusers_lumina2_lora_to_diffusers`` (through ``Lumina2Pipeline.lora_state_dict``) as the oracle.

That converter hardcodes the released qkv split [2304, 768, 768], so its oracle runs on a model with the released
attention sizes (hidden 2304, 24 query heads, 8 key/value heads of 96) and one block of each family, with a tiny
feed-forward; the round trip runs on a tiny model (hidden 64, 2 query heads, 1 key/value head)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

import adaptkit as ak
from adaptkit.core.coverage import CoverageError
from adaptkit.errors import UnsupportedError
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

TINY = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
            num_attention_heads=2, num_kv_heads=1, multiple_of=16, cap_feat_dim=16, axes_dim_rope=(8, 12, 12),
            axes_lens=(64, 32, 32))
# the released attention sizes (the converter's split), everything else small
RELEASED_ATTN = dict(TINY, hidden_size=2304, num_layers=1, num_attention_heads=24, num_kv_heads=8,
                     ffn_dim_multiplier=0.01, axes_dim_rope=(32, 32, 32))
ALPHAS = {"attn.to_k": 2.0, "attn.to_v": 3.0, "feed_forward.linear_2": 12.0, "norm1.linear": 1.0,
          "x_embedder": 5.0}


def _inputs(channels: int = 4, cap: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, channels, 4, 4, generator=g), timestep=torch.tensor([0.3]),
                encoder_hidden_states=torch.randn(1, 5, cap, generator=g),
                encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool))


@pytest.fixture(scope="module")
def base() -> Lumina2Transformer2DModel:
    torch.manual_seed(0)
    return Lumina2Transformer2DModel(**TINY).eval()


def test_every_linear_maps(base):
    lumina = ARCHS["lumina2"]
    assert arch_of_model(base) is lumina
    names = weight_modules(base)
    missing = [n for n in names if lumina.to_original(n) is None]
    assert not missing
    rule, members = lumina.to_diffusers("context_refiner.0.attention.qkv")
    assert rule.fused and members == tuple(f"context_refiner.0.attn.to_{x}" for x in "qkv")
    assert lumina.to_diffusers("final_layer.adaLN_modulation.1")[1] == ("norm_out.linear_1",)
    assert lumina.to_diffusers("context_refiner.1.attention_norm1")[1] == ("context_refiner.1.norm1",)
    assert lumina.to_diffusers("layers.1.attention_norm1")[1] == ("layers.1.norm1.norm",)


def test_roundtrip_every_module(base, tmp_path):
    peft_model = with_lora(base, weight_modules(base), ALPHAS)
    a = read_peft(peft_model, tmp_path, Lumina2Pipeline)
    assert len(a.layers) == len(weight_modules(base))
    orig, worst = roundtrip_check(a, base)
    qkv = orig.layers["unet.layers.1.attention.qkv"]
    assert tuple(qkv.shape) == (64 + 32 + 32, 64) and qkv.rank == 12  # block LoRA: rank = sum of the ranks
    assert "unet.layers.1.attention.to_q" not in orig.layers and "unet.final_layer.linear" in orig.layers
    print(f"lumina2 round trip: {len(a.layers)} -> {len(orig.layers)} layers, worst MapRow error {worst:.1e}")


def test_comfyui_layout_oracle(tmp_path):
    """``diffusion_model.<original>.lora_A/B`` on the blocks (the converter reads no alphas, no embedders and no
    final layer), scales baked into B; the stacked qkv LoRA is split by diffusers into q/k/v sharing its A."""
    torch.manual_seed(0)
    big = Lumina2Transformer2DModel(**RELEASED_ATTN).eval()
    blocks = [n for n in weight_modules(big) if n.startswith(("layers.", "noise_refiner.", "context_refiner."))]
    peft_model = with_lora(big, blocks, ALPHAS)
    a = read_peft(peft_model, tmp_path, Lumina2Pipeline)
    orig, rows = to_namespace(a, "original", base=big)
    assert tuple(orig.layers["unet.noise_refiner.0.attention.qkv"].shape) == (2304 + 768 + 768, 2304)
    sd = original_state_dict(orig, "comfyui", alphas=False)
    converted = Lumina2Pipeline.lora_state_dict(sd)
    worst = assert_deltas_match(a, converted_deltas(converted))
    err = loaded_outputs_match(peft_model, big, converted, _inputs())
    print(f"lumina2 comfyui oracle: {len(converted) // 2} modules, ΔW worst {worst:.1e}, output rel err {err:.1e}, "
          f"stack MapRow worst {max(r.error for r in rows):.1e}")
    with pytest.raises(ValueError, match="x_embedder"):  # diffusers reads no top-level LoRA for Lumina2
        Lumina2Pipeline.lora_state_dict({**sd, "diffusion_model.x_embedder.lora_A.weight": torch.zeros(4, 16),
                                         "diffusion_model.x_embedder.lora_B.weight": torch.zeros(2304, 4)})


def test_unmapped_path_is_a_coverage_error(base, tmp_path):
    a = read_peft(with_lora(base, ["layers.0.attn.to_q", "layers.0.feed_forward.linear_1"], {}), tmp_path,
                  Lumina2Pipeline)
    orig, _ = to_namespace(a, "original", base=base)
    one = orig.layers["unet.layers.0.feed_forward.w1"]
    bad = orig.replace(layers={**orig.layers, "unet.layers.0.feed_forward.w4": one})
    with pytest.raises(CoverageError, match=r"layers\.0\.feed_forward\.w4"):
        to_namespace(bad, "diffusers", arch="lumina2", base=base)
    out, _ = to_namespace(bad, "diffusers", arch="lumina2", base=base, drop="unet.layers.0.feed_forward.w4")
    assert set(out.layers) == set(a.layers)


def test_fused_rows_that_disagree_with_the_base(base, tmp_path):
    """A qkv LoRA from a model with 2 key/value heads (64 + 64 + 64 rows) against the tiny base (64 + 32 + 32): refused
    (the adapter is for another model); without a base, the rule's tokens split it (q = the input features, k and v
    the rest in halves); rows the tokens cannot divide (127: the 63 left for k and v are odd) are refused too."""
    torch.manual_seed(0)
    other = Lumina2Transformer2DModel(**dict(TINY, num_kv_heads=2)).eval()
    a = read_peft(with_lora(other, ["layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v"], {}), tmp_path,
                  Lumina2Pipeline)
    orig, _ = to_namespace(a, "original", base=other)
    qkv = orig.layers["unet.layers.0.attention.qkv"]
    assert tuple(qkv.shape) == (192, 64)
    with pytest.raises(UnsupportedError, match=r"layers\.0\.attention\.qkv has 192 x 64 but the base's"):
        to_namespace(orig, "diffusers", arch="lumina2", base=base)
    back, _ = to_namespace(orig, "diffusers", arch="lumina2")
    assert {p: tuple(l.shape) for p, l in back.layers.items()} == {p: tuple(l.shape) for p, l in a.layers.items()}
    cut = dataclasses.replace(qkv, up=qkv.up[:127], shape=(127, 64))
    with pytest.raises(UnsupportedError, match=r"layers\.0\.attention\.qkv"):
        to_namespace(orig.replace(layers={"unet.layers.0.attention.qkv": cut}), "diffusers", arch="lumina2")


def test_written_layouts(base, tmp_path):
    """ak.save as comfyui / kohya (original names) / diffusers, read back by ak.load (qkv stacked on the way out,
    split on the way back); load_lora_adapter reads the diffusers directory and gives the PEFT model's outputs.
    diffusers reads no kohya Lumina2 file, and its comfyui reader takes no ``.alpha`` (see the next test)."""
    peft_model = with_lora(base, weight_modules(base), ALPHAS, seed=4)
    a = read_peft(peft_model, tmp_path / "in", Lumina2Pipeline)
    files, worst = written_layouts(a, base, tmp_path / "out")
    assert "diffusion_model.context_refiner.0.attention.qkv.lora_A.weight" in file_tensors(files["comfyui"])
    assert "lora_unet_noise_refiner_0_attention_qkv.lora_down.weight" in file_tensors(files["kohya"])
    err = loaded_outputs_match(peft_model, base, str(files["diffusers"]), _inputs())
    print(f"lumina2 written layouts: read-back ΔW worst {worst:.1e}; diffusers dir outputs rel err {err:.1e}")


def test_written_comfyui_file_is_read_by_diffusers(tmp_path):
    """diffusers' Lumina2 converter pops no ``.alpha`` key (it refuses a file that has them); adaptkit's comfyui writer
    bakes each scale into lora_B and writes none, so diffusers reads the file (at the released attention sizes, where
    its hardcoded qkv split fits) to the same deltas."""
    torch.manual_seed(0)
    big = Lumina2Transformer2DModel(**RELEASED_ATTN).eval()
    blocks = [n for n in weight_modules(big) if n.startswith(("layers.", "noise_refiner.", "context_refiner."))]
    a = read_peft(with_lora(big, blocks, {}), tmp_path / "in", Lumina2Pipeline)
    out = ak.save(a, tmp_path / "c.safetensors", format="comfyui", base=big)
    assert not any(k.endswith(".alpha") for k in file_tensors(out))
    assert_deltas_match(a, converted_deltas(Lumina2Pipeline.lora_state_dict(file_tensors(out))))


def test_shipped_inventory_is_fully_mapped():
    from adaptkit.formats import names

    inv = names.shipped("lumina2")
    assert all(ARCHS["lumina2"].to_original(p) for p in inv.modules["transformer"])
    # 30 blocks x (to_q, to_k, to_v -> one qkv): 425 diffusers modules, 365 original ones
    assert (len(inv.modules["transformer"]), len(inv.modules["unet"])) == (425, 365)
    assert inv.modules["unet"]["layers.25.attention.qkv"] == (2304 + 768 + 768, 2304)
    assert inv.modules["unet"]["cap_embedder.1"] == (2304, 2304)
    assert inv.modules["unet"]["final_layer.adaLN_modulation.1"] == (2304, 1024)
