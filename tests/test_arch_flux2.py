"""Flux.2: BFL names <-> diffusers' ``Flux2Transformer2DModel``, against diffusers' own converters.

Oracles (none written here): ``Flux2Pipeline.lora_state_dict`` on the ai-toolkit/ComfyUI (``diffusion_model.``) and
kohya (``lora_unet_``) files built from adaptkit's original-namespace adapter; ``load_lora_adapter`` of the result on a
fresh tiny model; diffusers' checkpoint converter ``convert_flux2_transformer_checkpoint_to_diffusers`` on the dense
ΔW in original names. All run on the tiny model (the Flux.2 converters size nothing from the released model).
"""

from __future__ import annotations

import copy

import pytest
import torch

import adaptkit as ak
from adaptkit.core.kinds import LoRA
from adaptkit.errors import UnsupportedError
from adaptkit.formats.arch import ARCHS, get_arch
from adaptkit.formats.arch.remap import to_namespace
from tests.arch_models import (
    FLUX2_TINY,
    add_lora,
    check_round_trip,
    deltas,
    load_written_diffusers,
    make_case,
    max_rel,
    original_state,
    peft_deltas,
    rel,
    report,
    run_model,
    state_deltas,
    swap_rows,
    tiny,
    weight_modules,
)

ALPHAS = {"transformer_blocks.0.attn.to_k": 2.0, "transformer_blocks.0.attn.add_v_proj": 16.0,
          "single_transformer_blocks.0.attn.to_qkv_mlp_proj": 3.0}
DROPPED_BY_KOHYA = {"double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                    "single_stream_modulation.linear", "time_guidance_embed.guidance_embedder.linear_1",
                    "time_guidance_embed.guidance_embedder.linear_2", "norm_out.linear"}


def inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.randint(0, 4, (4, 4), generator=g).float(),
                txt_ids=torch.zeros(3, 4), guidance=torch.tensor([3.5]))


def run(model):
    return run_model(model, inputs())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case("Flux2Transformer2DModel", FLUX2_TINY, "Flux2Pipeline", tmp_path_factory.mktemp("flux2"),
                     ALPHAS)


def test_every_weight_module_maps():
    model = tiny("Flux2Transformer2DModel", FLUX2_TINY)
    arch = get_arch("flux2")
    missing = [n for n in weight_modules(model) if arch.to_original(n) is None]
    assert not missing
    assert ARCHS["flux2"].to_diffusers("final_layer.adaLN_modulation.1")[0].swap


def test_round_trip_is_exact(case):
    a, orig, back = case["a"], case["orig"], case["back"]
    assert len(a.layers) == len(weight_modules(case["base"])) == 25
    assert set(back.layers) == set(a.layers)
    # the packed double-block projections are block LoRAs: rank 4+4+4; linear1 is a rename in diffusers
    assert orig.layers["unet.double_blocks.0.img_attn.qkv"].rank == 12
    assert orig.layers["unet.single_blocks.0.linear1"].rank == 4
    check_round_trip(case, "flux2")


def test_diffusers_ai_toolkit_converter_oracle(case):
    """``diffusion_model.<BFL name>.lora_A/B`` (ai-toolkit, ComfyUI) -> Flux2Pipeline.lora_state_dict."""
    import diffusers

    want = deltas(case["a"], "transformer")
    conv = diffusers.Flux2Pipeline.lora_state_dict(original_state(case["orig"], "bfl"))
    got = state_deltas(conv)
    # diffusers' LoRA converter renames final_layer.adaLN_modulation.1 without the (shift, scale) swap that its own
    # checkpoint converter (and Flux.1's LoRA converter) applies: its norm_out.linear is ours with halves swapped
    assert rel(got.pop("norm_out.linear"), swap_rows(want.pop("norm_out.linear"))) < 1e-6
    assert report("flux2 (i) ai-toolkit converter rel dW", max_rel(got, want)) < 1e-5
    # (ii) the converted file, minus that key, on a fresh model == the PEFT model without its norm_out LoRA
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter({k: v for k, v in conv.items() if ".norm_out." not in k}, prefix="transformer",
                            adapter_name="x")
    ref = copy.deepcopy(case["model"])
    with torch.no_grad():
        ref.norm_out.linear.lora_B["default"].weight.zero_()
    out, want = run(fresh), run(ref)
    assert report("flux2 LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("flux2 (ii) ai-toolkit file via lora_state_dict, output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


def test_diffusers_kohya_converter_oracle(case):
    """``lora_unet_<BFL name>`` + ``.alpha`` (sd-scripts, musubi-tuner) -> Flux2Pipeline.lora_state_dict."""
    import diffusers

    want = deltas(case["a"], "transformer")
    conv = diffusers.Flux2Pipeline.lora_state_dict(original_state(case["orig"], "kohya"))
    got = state_deltas(conv)
    # the kohya converter maps the blocks and embedders; it drops (with a warning) the shared modulation layers,
    # the guidance embedder and the final adaptive norm
    assert set(want) - set(got) == DROPPED_BY_KOHYA
    assert report("flux2 (i) kohya converter rel dW", max_rel(got, {k: v for k, v in want.items() if k in got})) < 1e-5
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter(conv, prefix="transformer", adapter_name="x")
    ref = add_lora(copy.deepcopy(case["base"]), alpha_pattern=ALPHAS)  # same seed: the same factors
    with torch.no_grad():
        for name in DROPPED_BY_KOHYA:
            ref.get_submodule(name).lora_B["default"].weight.zero_()
    assert max_rel(peft_deltas(ref), peft_deltas(case["model"]) | {n: torch.zeros_like(peft_deltas(ref)[n])
                                                                    for n in DROPPED_BY_KOHYA}) < 1e-6
    out, want = run(fresh), run(ref)
    assert report("flux2 LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("flux2 (ii) kohya file via lora_state_dict, output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


def test_diffusers_layout_loads_into_the_tiny_model(case):
    """(ii) the round-tripped diffusers-namespace adapter on a fresh model == the PEFT model (rtol 1e-4)."""
    back = case["back"]
    state = {}
    for p, layer in back.layers.items():
        state[f"{p}.lora_A.weight"] = layer.down
        state[f"{p}.lora_B.weight"] = layer.up * layer.scale
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    out, want = run(fresh), run(case["model"])
    assert report("flux2 LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("flux2 (ii) diffusers layout, output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


def test_checkpoint_converter_oracle(case):
    """diffusers' Flux.2 checkpoint converter on the dense ΔW in BFL names == adaptkit's diffusers ΔW."""
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
    )

    ckpt = {f"{p.partition('.')[2]}.weight": d for p, d in
            ((p, layer.factors()[0] @ layer.factors()[1]) for p, layer in case["orig"].layers.items())}
    conv = convert_flux2_transformer_checkpoint_to_diffusers(ckpt)
    got = {k[:-len(".weight")]: v for k, v in conv.items()}
    assert report("flux2 checkpoint converter rel dW", max_rel(got, deltas(case["a"], "transformer"))) < 1e-6


def test_bad_inputs(case):
    orig = case["orig"]
    extra = LoRA(down=torch.randn(2, 32), up=torch.randn(32, 2), alpha=2.0, shape=(32, 32))
    odd = orig.replace(layers={**orig.layers, "unet.double_blocks.0.img_attn.norm.query_norm": extra})
    with pytest.raises(ak.CoverageError, match="query_norm"):
        to_namespace(odd, "diffusers", base=case["base"])
    kept, _ = to_namespace(odd, "diffusers", base=case["base"], drop="*query_norm*")
    assert set(kept.layers) == set(case["a"].layers)
    # a packed qkv whose rows neither match the base's q/k/v (96 rows) nor split in three: refused, naming it
    bad = orig.replace(layers={**orig.layers, "unet.double_blocks.0.img_attn.qkv":
                               LoRA(down=torch.randn(2, 32), up=torch.randn(91, 2), alpha=2.0, shape=(91, 32))})
    with pytest.raises(UnsupportedError, match="img_attn.qkv"):
        to_namespace(bad, "diffusers", base=case["base"])


def test_public_api_writes_every_layout(case, tmp_path):
    """``ak.save`` to comfyui / kohya (original names) / diffusers, read back by layout detection, and diffusers'
    loaders on the written files."""
    import diffusers
    from safetensors.torch import load_file, save_file

    a, orig, base = case["a"], case["orig"], case["base"]
    want_orig = deltas(orig, "unet")
    comfy = ak.save(a, tmp_path / "comfy.safetensors", format="comfyui")
    kohya = ak.save(a, tmp_path / "kohya.safetensors", format="kohya", naming="original")
    diff = ak.save(orig, tmp_path / "diffusers", format="diffusers")
    c, k, d = ak.load(comfy), ak.load(kohya, base=base), ak.load(diff)
    assert (c.format, k.format, d.format) == ("comfyui", "kohya", "diffusers")
    assert report("flux2 e2e comfyui read back rel dW", max_rel(deltas(c, "unet"), want_orig)) < 1e-6
    assert report("flux2 e2e kohya read back rel dW", max_rel(deltas(k, "unet"), want_orig)) < 1e-6
    got = deltas(d, "transformer")
    assert report("flux2 e2e diffusers read back rel dW", max_rel(got, deltas(a, "transformer"))) < 1e-6
    want = deltas(a, "transformer")
    # diffusers' Flux.2 `diffusion_model.` converter refuses `.alpha` keys: adaptkit's comfyui writer bakes the scale
    # into lora_B and writes none, as ai-toolkit's Flux.2 files do (diffusion_model.<BFL name>, no alphas)
    baked = load_file(str(comfy))
    assert not any(k.endswith(".alpha") for k in baked)
    save_file(baked, str(tmp_path / "aitk.safetensors"))
    t = ak.load(tmp_path / "aitk.safetensors")
    assert t.format == "comfyui"
    assert report("flux2 e2e ai-toolkit (no alpha) file read rel dW", max_rel(deltas(t, "unet"), want_orig)) < 1e-6
    got = state_deltas(diffusers.Flux2Pipeline.lora_state_dict(baked))
    assert rel(got.pop("norm_out.linear"), swap_rows(want["norm_out.linear"])) < 1e-6
    assert report("flux2 e2e comfyui file -> diffusers rel dW", max_rel(got, {n: w for n, w in want.items()
                                                                               if n != "norm_out.linear"})) < 1e-5
    got = state_deltas(diffusers.Flux2Pipeline.lora_state_dict(load_file(str(kohya))))
    assert report("flux2 e2e kohya file -> diffusers rel dW", max_rel(got, {n: w for n, w in want.items()
                                                                             if n not in DROPPED_BY_KOHYA})) < 1e-5
    fresh = load_written_diffusers(copy.deepcopy(base), diff, "Flux2Pipeline")
    out, ref = run(fresh), run(case["model"])
    report("flux2 e2e diffusers file -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    # ai-toolkit: one file, diffusers keys, scales baked (written from the original names: mapped back exactly)
    aitk = ak.save(orig, tmp_path / "written_aitk.safetensors", format="ai-toolkit")
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(diffusers.Flux2Pipeline.lora_state_dict(load_file(str(aitk))), prefix="transformer",
                            adapter_name="x")
    out = run(fresh)
    report("flux2 e2e ai-toolkit file -> lora_state_dict -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
