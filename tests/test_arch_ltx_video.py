"""LTX-Video: the module map against a tiny ``LTXVideoTransformer3DModel`` and diffusers' own converter.

The original names are diffusers' names for every transformer block, the caption projection and ``proj_out``;
``patchify_proj`` / ``adaln_single`` are diffusers' ``proj_in`` / ``time_embed`` (diffusers' single-file converter
and ComfyUI's ``LTXVModel``). diffusers' LoRA converter (``LTXPipeline.lora_state_dict`` on ``diffusion_model.``
files) only strips the prefix, so it reads the block modules right and leaves LoRAs on ``patchify_proj`` /
``adaln_single.*`` under names the model does not have: ``test_oracle_converter_tiny`` pins that. No weight is packed
in LTX-Video, so there is no fused layer whose rows could disagree with the base.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adaptkit as ak
from adaptkit.core.coverage import CoverageError
from adaptkit.formats import names
from adaptkit.formats.arch import ARCHS
from adaptkit.formats.arch.remap import to_namespace

from .arch_c_helpers import (
    coverage_gaps,
    diffusers_loaded,
    load_converted,
    lora_targets,
    oracle_mismatches,
    original_state_dict,
    peft_adapter,
    rel,
    round_trip,
    written_round_trips,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

ARCH = ARCHS["ltx_video"]
CFG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
           num_layers=1, caption_channels=12)
ALPHAS = {"attn1.to_k": 2.0, "attn2.to_v": 16.0, "ff.net.2": 4.0, "time_embed.linear": 3.0}
#: diffusers' names for what the original file calls patchify_proj / adaln_single.*
RENAMED = {"proj_in": "patchify_proj", "time_embed.linear": "adaln_single.linear",
           "time_embed.emb.timestep_embedder.linear_1": "adaln_single.emb.timestep_embedder.linear_1",
           "time_embed.emb.timestep_embedder.linear_2": "adaln_single.emb.timestep_embedder.linear_2"}


def tiny():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(**CFG).eval()


def forward(model):
    g = torch.Generator().manual_seed(3)
    kw = dict(hidden_states=torch.randn(1, 2 * 2 * 2, 4, generator=g),
              encoder_hidden_states=torch.randn(1, 5, 12, generator=g), timestep=torch.tensor([500]),
              encoder_attention_mask=torch.ones(1, 5), num_frames=2, height=2, width=2)
    with torch.no_grad():
        return model(**kw).sample


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny()
    model = copy.deepcopy(base)
    a = peft_adapter(model, tmp_path_factory.mktemp("ltx") / "a", ARCH.pipeline, alpha_pattern=ALPHAS)
    return base, model, a


def test_rules_cover_every_module(setup):
    base, _, a = setup
    assert coverage_gaps(ARCH, base) == []
    assert len(a.layers) == len(lora_targets(base)) == 17
    for diff, orig in RENAMED.items():
        assert ARCH.to_original(diff)[1] == orig
    same = [p for p in lora_targets(base) if p not in RENAMED]
    assert all(ARCH.to_original(p)[1] == p for p in same)
    assert ARCH.to_original("transformer_blocks.0.attn2.norm_q")[1] == "transformer_blocks.0.attn2.q_norm"
    unet = names.shipped("ltx_video").modules["unet"]
    assert tuple(unet["patchify_proj"]) == (2048, 128) and tuple(unet["adaln_single.linear"]) == (12288, 2048)
    assert tuple(unet["transformer_blocks.27.attn2.to_k"]) == (2048, 2048)


def test_round_trip(setup):
    base, _, a = setup
    fig = round_trip(a, base)
    print("ltx_video round trip", fig)
    assert fig["original_layers"] == 17 and fig["stacked"] == 0 and fig["tensors_equal"] == 17
    assert fig["delta"] == 0.0 and fig["row_original"] == 0.0 and fig["row_diffusers"] == 0.0


def test_oracle_converter_tiny(setup):
    """(c i) diffusers' converter output equals adaptkit's diffusers namespace on every block module; the renamed
    top-level modules come out under their original names, which the diffusers model lacks."""
    from diffusers import LTXPipeline

    base, _, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    converted = LTXPipeline.lora_state_dict(original_state_dict(orig))
    bad = oracle_mismatches(converted, a)
    worst = bad.pop("")
    print("ltx_video oracle: worst agreeing error", worst, "disagree:", bad)
    want = {f"transformer.{o}": "not a module of the adapter" for o in RENAMED.values()}
    want |= {f"transformer.{d}": "missing from the converted file" for d in RENAMED}
    assert bad == want
    mods = dict(base.named_modules())
    assert not any(o in mods for o in RENAMED.values())


def test_oracle_outputs(setup, tmp_path):
    """(c ii) load_lora_adapter of the converted file on a fresh tiny model == the PEFT model (block modules, the
    caption projection and proj_out: what diffusers' converter maps)."""
    from diffusers import LTXPipeline

    base, _, _ = setup
    model = copy.deepcopy(base)
    targets = [p for p in lora_targets(base) if p not in RENAMED]
    a = peft_adapter(model, tmp_path / "sub", ARCH.pipeline, targets=targets, alpha_pattern=ALPHAS, seed=2)
    orig, _ = to_namespace(a, "original", base=base)
    fresh = load_converted(base, LTXPipeline.lora_state_dict(original_state_dict(orig)))
    want, got, plain = forward(model), forward(fresh), forward(base)
    print("ltx_video outputs: rel error", rel(got, want), "adapter effect", rel(want, plain))
    assert rel(want, plain) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unmapped_path_and_drop(setup):
    base, _, a = setup
    extra = next(iter(a.layers.values()))
    bad = a.replace(layers={**a.layers, "transformer.scale_shift_table_proj": extra})
    with pytest.raises(CoverageError, match="scale_shift_table_proj"):
        to_namespace(bad, "original", base=base)
    out, _ = to_namespace(bad, "original", base=base, drop="transformer.scale_shift_table_proj")
    assert len(out.layers) == 17 and "unet.patchify_proj" in out.layers


# ------------------------------------------------------------------ the public API (ak.save / ak.load)


def test_written_layouts(setup, tmp_path):
    """comfyui / kohya (original names) / diffusers files written by ak.save read back (layout detected) to the same
    ΔW; the diffusers file loads in diffusers and gives the PEFT model's outputs."""
    base, model, a = setup
    fig = written_round_trips(a, base, tmp_path)
    fresh = diffusers_loaded(base, ARCH.pipeline, fig.pop("paths")["diffusers"])
    err = rel(forward(fresh), forward(model))
    print("ltx_video written layouts: max ΔW error", fig, "diffusers file outputs", err)
    assert max(fig.values()) < 1e-6
    torch.testing.assert_close(forward(fresh), forward(model), rtol=1e-4, atol=1e-5)


def test_written_comfyui_file_in_diffusers(setup, tmp_path):
    """The comfyui file adaptkit writes, read by diffusers' own converter: diffusers ignores ``alpha`` keys, and adaptkit
    writes none (the scale is baked into lora_B), so both a scale-1 adapter and one with other alphas read right."""
    from diffusers import LTXPipeline
    from safetensors.torch import load_file

    base = setup[0]
    targets = [p for p in lora_targets(base) if p not in RENAMED]
    model = copy.deepcopy(base)
    a = peft_adapter(model, tmp_path / "unit", ARCH.pipeline, targets=targets, alpha=4.0, seed=4)
    path = ak.save(a, tmp_path / "c", format="comfyui", base=base)
    fresh = load_converted(base, LTXPipeline.lora_state_dict(load_file(str(path))))
    torch.testing.assert_close(forward(fresh), forward(model), rtol=1e-4, atol=1e-5)
    scaled = copy.deepcopy(base)
    b = peft_adapter(scaled, tmp_path / "scaled", ARCH.pipeline, targets=targets, alpha_pattern=ALPHAS, seed=4)
    path = ak.save(b, tmp_path / "c2", format="comfyui", base=base)
    assert not any(k.endswith(".alpha") for k in load_file(str(path)))
    err = rel(forward(load_converted(base, LTXPipeline.lora_state_dict(load_file(str(path))))), forward(scaled))
    print("ltx_video comfyui file (other alphas, scale baked) in diffusers: output rel", err)
    assert err < 1e-4


def test_save_lora_adapter_metadata_gives_peft_scales(tmp_path):
    import peft

    model = tiny()
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], init_lora_weights=False))
    model.save_lora_adapter(str(tmp_path))
    a = ak.load(str(tmp_path), format="diffusers")
    assert {layer.scale for layer in a.layers.values()} == {2.0}
