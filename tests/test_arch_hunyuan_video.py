"""HunyuanVideo: the module map against a tiny ``HunyuanVideoTransformer3DModel`` and diffusers' own converter.

Oracles no one here wrote: diffusers' ``HunyuanVideoPipeline.lora_state_dict`` (``_convert_hunyuan_video_lora_to_
diffusers``) on the original-layout file adaptkit's original namespace gives, and ``load_lora_adapter`` of its output
on a fresh tiny model against the PEFT model the adapter came from.

diffusers' converter hardcodes the released hidden size (3072) to split ``single_blocks.{i}.linear1``: that split is
checked at state-dict level with the released dims (``test_oracle_linear1_released_dims``), the tiny model's file
leaves ``linear1`` out. Two of its branches chunk ``lora_A`` like a weight (``final_layer.adaLN_modulation.1``: the
rank halves are swapped with the rows; the refiner's ``self_attn_qkv``: ``lora_A`` is cut in three along the rank),
so diffusers cannot read LoRAs on those modules correctly; ``test_oracle_converter_tiny`` pins exactly that set.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adaptkit as ak
from adaptkit.core.adapter import Adapter
from adaptkit.core.coverage import CoverageError
from adaptkit.core.kinds import LoRA
from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.formats import names
from adaptkit.formats.arch import ARCHS
from adaptkit.formats.arch.remap import to_namespace

from .arch_c_helpers import (
    converted_deltas,
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

ARCH = ARCHS["hunyuan_video"]
CFG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
           num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=12,
           pooled_projection_dim=6, rope_axes_dim=(2, 2, 4))
#: per-module alphas (the rest: 8 at rank 4), so stacked q/k/v members carry different scales
ALPHAS = {"attn.to_k": 2.0, "proj_mlp": 16.0, "add_v_proj": 4.0, "norm_out.linear": 3.0}
RB = "transformer.context_embedder.token_refiner.refiner_blocks.0.attn."
#: the modules diffusers' converter gets wrong (it chunks lora_A) and the ones the tiny file leaves out (linear1)
DIFFUSERS_WRONG = {"transformer.norm_out.linear", RB + "to_q", RB + "to_k", RB + "to_v"}
LINEAR1 = {f"transformer.single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def tiny():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**CFG).eval()


def forward(model):
    g = torch.Generator().manual_seed(3)
    kw = dict(hidden_states=torch.randn(1, 4, 2, 2, 2, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 5, 12, generator=g), encoder_attention_mask=torch.ones(1, 5),
              pooled_projections=torch.randn(1, 6, generator=g), guidance=torch.tensor([3500.0]))
    with torch.no_grad():
        return model(**kw).sample


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny()
    model = copy.deepcopy(base)
    a = peft_adapter(model, tmp_path_factory.mktemp("hv") / "a", ARCH.pipeline, alpha_pattern=ALPHAS)
    return base, model, a


def test_rules_cover_every_module(setup):
    from diffusers import HunyuanVideoTransformer3DModel

    base, _, a = setup
    assert coverage_gaps(ARCH, base) == []
    for i2v in ("token_replace", "latent_concat"):  # HunyuanVideo-I2V's blocks name the same modules
        assert coverage_gaps(ARCH, HunyuanVideoTransformer3DModel(**CFG, image_condition_type=i2v)) == []
    assert len(a.layers) == len(lora_targets(base)) == 41
    unet = names.shipped("hunyuan_video").modules["unet"]
    assert tuple(unet["double_blocks.19.img_attn_qkv"]) == (9216, 3072)
    assert tuple(unet["single_blocks.39.linear1"]) == (21504, 3072)
    assert tuple(unet["txt_in.individual_token_refiner.blocks.1.self_attn_qkv"]) == (9216, 3072)
    assert len(unet) == 20 * 10 + 40 * 3 + 2 * 5 + 5 + 9


def test_round_trip(setup):
    base, _, a = setup
    fig = round_trip(a, base)
    print("hunyuan_video round trip", fig)
    assert fig["original_layers"] == 32 and fig["stacked"] == 4
    assert fig["delta"] < 1e-6 and fig["row_original"] < 1e-6 and fig["row_diffusers"] < 1e-6


def test_oracle_converter_tiny(setup):
    """(c i) diffusers' converter output per module equals adaptkit's diffusers namespace, except where the
    converter is wrong (pinned) and linear1 (released hidden size hardcoded)."""
    from diffusers import HunyuanVideoPipeline

    base, _, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    converted = HunyuanVideoPipeline.lora_state_dict(original_state_dict(orig, skip=("linear1",)))
    bad = oracle_mismatches(converted, a)
    worst = bad.pop("")
    print("hunyuan_video oracle: worst agreeing error", worst, "disagree:", bad)
    assert set(bad) == DIFFUSERS_WRONG | LINEAR1
    assert all(bad[m] == "missing from the converted file" for m in LINEAR1)
    assert bad["transformer.norm_out.linear"].startswith("error")
    assert all(bad[m] == "shape" for m in DIFFUSERS_WRONG - {"transformer.norm_out.linear"})


def test_oracle_outputs(setup, tmp_path):
    """(c ii) load_lora_adapter of the converted file on a fresh tiny model == the PEFT model (the adapter covers every
    module diffusers' converter handles at tiny dims)."""
    from diffusers import HunyuanVideoPipeline

    base, _, _ = setup
    model = copy.deepcopy(base)
    targets = sorted(set(lora_targets(base)) - {m.partition(".")[2] for m in DIFFUSERS_WRONG | LINEAR1})
    a = peft_adapter(model, tmp_path / "sub", ARCH.pipeline, targets=targets, alpha_pattern=ALPHAS, seed=2)
    orig, _ = to_namespace(a, "original", base=base)
    converted = HunyuanVideoPipeline.lora_state_dict(original_state_dict(orig))
    fresh = load_converted(base, converted)
    want, got, plain = forward(model), forward(fresh), forward(base)
    print("hunyuan_video outputs: rel error", rel(got, want), "adapter effect", rel(want, plain))
    assert rel(want, plain) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _lora(out, inp, r, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    return LoRA(down=torch.randn(r, inp, generator=g) / inp ** 0.5, up=torch.randn(out, r, generator=g), alpha=alpha,
                shape=(out, inp))


def test_oracle_linear1_released_dims():
    """(c i) at state-dict level with the released dims: linear1 = q/k/v (3072 each) + proj_mlp (12288)."""
    from diffusers import HunyuanVideoPipeline

    S, T = "transformer.single_transformer_blocks.0.", "transformer.transformer_blocks.0.attn."
    layers = {S + "attn.to_q": _lora(3072, 3072, 2, 2.0, 0), S + "attn.to_k": _lora(3072, 3072, 2, 8.0, 1),
              S + "attn.to_v": _lora(3072, 3072, 3, 3.0, 2), S + "proj_mlp": _lora(12288, 3072, 2, 1.0, 3),
              T + "to_q": _lora(3072, 3072, 2, 2.0, 4)}  # img_attn_qkv: what the pipeline detects the layout by
    a = Adapter(layers=layers)
    orig, rows = to_namespace(a, "original", arch="hunyuan_video")
    fused = orig.layers["unet.single_blocks.0.linear1"]
    assert tuple(fused.shape) == (21504, 3072) and fused.rank == 9
    converted = HunyuanVideoPipeline.lora_state_dict(original_state_dict(orig))
    deltas = converted_deltas(converted)
    errs = {m: rel(deltas[m], layer.delta_matrix()) for m, layer in layers.items()}
    print("hunyuan_video linear1 at released dims:", errs, "max row error", max(r.error for r in rows))
    assert max(errs.values()) < 1e-5
    # the absent img_attn k/v members come out of diffusers' split as exact zeros
    assert float(deltas[T + "to_k"].abs().max()) == 0.0


def test_unmapped_path_and_drop(setup):
    base, _, a = setup
    extra = next(iter(a.layers.values()))
    bad = a.replace(layers={**a.layers, "transformer.not_a_module": extra})
    with pytest.raises(CoverageError, match="not_a_module"):
        to_namespace(bad, "original", base=base)
    out, _ = to_namespace(bad, "original", base=base, drop="transformer.not_a_module")
    assert not any("not_a_module" in p for p in out.layers) and len(out.layers) == 32
    orig, _ = to_namespace(a, "original", base=base)
    bad_orig = orig.replace(layers={**orig.layers, "unet.double_blocks.0.img_attn.q": extra})
    with pytest.raises(CoverageError, match=r"double_blocks\.0\.img_attn\.q\b"):
        to_namespace(bad_orig, "diffusers", base=base)


def test_fused_rows_disagree(setup):
    base, _, _ = setup
    wrong = Adapter(layers={"unet.double_blocks.0.img_attn_qkv": _lora(40, 16, 2, 2.0, 5)})
    with pytest.raises(UnsupportedError, match=r"double_blocks\.0\.img_attn_qkv has 40 x 16 but the base's"):
        to_namespace(wrong, "diffusers", base=base)


def test_fused_rows_disagree_divisible(setup):
    """42 rows split evenly (3 x 14), but the base given says 3 x 16: refused, not split by the rule's tokens."""
    base, _, _ = setup
    wrong = Adapter(layers={"unet.double_blocks.0.img_attn_qkv": _lora(42, 16, 2, 2.0, 5)})
    with pytest.raises(UnsupportedError, match=r"double_blocks\.0\.img_attn_qkv"):
        to_namespace(wrong, "diffusers", base=base)


def test_musubi_kohya_file_reads(setup, tmp_path):
    """A musubi-tuner style file (``lora_unet_<flattened original path>.lora_down/lora_up/alpha``, what musubi writes
    for HunyuanVideo) reads with the tiny model as base into original names, and maps to diffusers' ΔW exactly."""
    from safetensors.torch import save_file

    base, _, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    sd = {}
    for path, layer in orig.layers.items():
        key = "lora_unet_" + path.partition(".")[2].replace(".", "_")
        sd[key + ".lora_down.weight"] = layer.down.contiguous()
        sd[key + ".lora_up.weight"] = layer.up.contiguous()
        sd[key + ".alpha"] = torch.tensor(float(layer.alpha))
    save_file(sd, str(tmp_path / "musubi.safetensors"))
    read = ak.load(str(tmp_path / "musubi.safetensors"), base=base)
    assert read.format == "kohya" and set(read.layers) == set(orig.layers)
    back, _ = to_namespace(read, "diffusers", base=base)
    assert set(back.layers) == set(a.layers)
    assert max(rel(back.layers[p].delta_matrix(), a.layers[p].delta_matrix()) for p in a.layers) < 1e-6


#: ComfyUI's own (Flux-layer) names for HunyuanVideo modules, the inverse of its key map's replacements
#: (comfy/lora.py model_lora_keys_unet) plus MLPEmbedder's in_layer/out_layer (comfy/ldm/hunyuan_video/model.py)
COMFY = (("_mod.linear", "_mod.lin"), ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("mlp.fc1", "mlp.0"),
         ("mlp.fc2", "mlp.2"), (".modulation.linear", ".modulation.lin"))


def _comfy_name(path):
    for old, new in COMFY:
        path = path.replace(old, new)
    if path.startswith(("unet.time_in.", "unet.guidance_in.", "unet.txt_in.t_embedder.")):
        path = path.replace("mlp.0", "in_layer").replace("mlp.2", "out_layer")
    return path.replace("c_embedder.linear_1", "c_embedder.in_layer").replace("c_embedder.linear_2", "c_embedder.out_layer")


def test_comfyui_internal_names_read_as_aliases(setup):
    """Files in ComfyUI's own HunyuanVideo names (Flux-style) map to the same diffusers ΔW; adaptkit writes Tencent's."""
    base, _, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    comfy = orig.replace(layers={_comfy_name(p): layer for p, layer in orig.layers.items()})
    assert len(set(comfy.layers) - set(orig.layers)) == 23
    back, _ = to_namespace(comfy, "diffusers", base=base)
    assert set(back.layers) == set(a.layers)
    assert max(rel(back.layers[p].delta_matrix(), a.layers[p].delta_matrix()) for p in a.layers) == 0.0
    again, _ = to_namespace(back, "original", base=base)
    assert set(again.layers) == set(orig.layers)


def test_written_layouts(setup, tmp_path):
    """comfyui / kohya (original names) / diffusers files written by ak.save read back (layout detected) to the same
    ΔW; the diffusers file (written from the original namespace: packed layers split back) loads in diffusers and
    gives the PEFT model's outputs with every module adapted."""
    base, model, a = setup
    fig = written_round_trips(a, base, tmp_path)
    fresh = diffusers_loaded(base, ARCH.pipeline, fig.pop("paths")["diffusers"])
    err = rel(forward(fresh), forward(model))
    print("hunyuan_video written layouts: max ΔW error", fig, "diffusers file outputs", err)
    assert max(fig.values()) < 1e-6
    torch.testing.assert_close(forward(fresh), forward(model), rtol=1e-4, atol=1e-5)


def test_written_comfyui_file_in_diffusers(setup, tmp_path):
    """diffusers' HunyuanVideo converter chunks a scalar ``alpha`` of ``img_attn_qkv`` like a weight and crashes
    (diffusion-pipe's files carry no alphas): adaptkit's comfyui files have none (the scale is baked into lora_B), and
    the converter reads the double blocks' attention to adaptkit's deltas (the double blocks only: it hardcodes the
    released 3072-wide split of the single blocks' linear1)."""
    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import load_file

    base, _, a = setup
    a = a.replace(layers={p: v for p, v in a.layers.items() if p.startswith("transformer.transformer_blocks.")})
    path = ak.save(a, tmp_path / "c", format="comfyui", base=base)
    sd = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in sd)
    converted = HunyuanVideoPipeline.lora_state_dict(sd)
    checked = 0
    for p, layer in a.layers.items():
        key = p.partition(".")[2]
        if ".attn." in key and key.startswith("transformer_blocks.") and f"transformer.{key}.lora_A.weight" in converted:
            got = converted[f"transformer.{key}.lora_B.weight"] @ converted[f"transformer.{key}.lora_A.weight"]
            torch.testing.assert_close(got, layer.delta_math(), rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked >= 6


# ------------------------------------------------------------------ kohya names shared with Flux.1

#: flattened kohya names both architectures have, with the same shapes (hidden 3072): attention + single blocks
SHARED = {"double_blocks_0_img_attn_qkv": (9216, 3072), "double_blocks_0_img_attn_proj": (3072, 3072),
          "double_blocks_0_txt_attn_qkv": (9216, 3072), "double_blocks_0_txt_attn_proj": (3072, 3072),
          "single_blocks_0_linear1": (21504, 3072), "single_blocks_0_linear2": (3072, 15360),
          "final_layer_linear": (64, 3072), "final_layer_adaLN_modulation_1": (6144, 3072)}


def _resolve(inv_name, flats):
    inv = names.shipped(inv_name)
    keys = [("unet", f) for f in flats]
    return names.resolve_names(keys, base=inv, shapes={k: SHARED.get(k[1]) for k in keys})


def test_kohya_names_fit_flux_and_hunyuan_video():
    """A musubi-style HunyuanVideo file of attention and single-block layers fits both shipped inventories, with
    different original paths: the name set alone cannot tell the architectures apart."""
    flux, hv = _resolve("flux", SHARED), _resolve("hunyuan_video", SHARED)
    assert set(flux.paths) == set(hv.paths) == {("unet", f) for f in SHARED}
    assert flux.paths[("unet", "double_blocks_0_img_attn_qkv")][0] == "double_blocks.0.img_attn.qkv"
    assert hv.paths[("unet", "double_blocks_0_img_attn_qkv")][0] == "double_blocks.0.img_attn_qkv"
    # the modulation / MLP names tell them apart
    with pytest.raises(CoverageError, match="img_mod_linear"):
        _resolve("flux", ["double_blocks_0_img_mod_linear"])
    assert _resolve("hunyuan_video", ["double_blocks_0_img_mod_linear", "double_blocks_0_img_mlp_fc1"]).paths


def test_kohya_names_shared_with_flux_are_ambiguous_without_base():
    keys = [("unet", f) for f in SHARED]
    shapes = {k: SHARED[k[1]] for k in keys}
    with pytest.raises(ConfigError, match=r"flux.*hunyuan_video|hunyuan_video.*flux"):
        names.resolve_names(keys, shapes=shapes)
    picked = names.resolve_names(keys, base="hunyuan_video", shapes=shapes)
    assert picked.paths[("unet", "single_blocks_0_linear1")][0] == "single_blocks.0.linear1"
    assert picked.paths[("unet", "double_blocks_0_img_attn_qkv")][0] == "double_blocks.0.img_attn_qkv"
