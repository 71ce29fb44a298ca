"""Flux.1 LoRAs in every layout, both directions: diffusers, kohya (sd-scripts BFL names), ComfyUI (original names),
XLabs, ai-toolkit.

A tiny ``FluxTransformer2DModel`` (seeded) carries a PEFT LoRA on every linear module (per-module alphas through
``alpha_pattern``). Oracles not written here: PEFT (the adapted model's outputs), diffusers' ``FluxPipeline.
lora_state_dict`` (its kohya / XLabs / ai-toolkit converters) and ``load_lora_adapter`` on a fresh copy of the model.
diffusers' kohya converter hardcodes Flux.1-dev's sizes for ``single_blocks.N.linear1`` (3072 + 3 x 3072 + 12288
rows): that module is checked at the released sizes on state dicts (small rank; no model is built).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.core.blocks import split_rows, stack_rows
from adaptkit.core.coverage import CoverageError
from adaptkit.core.kinds import LoRA
from adaptkit.errors import FormatError, UnsupportedError
from adaptkit.formats.arch.remap import to_namespace

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CFG = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def tiny_flux():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(**CFG).eval()


def linear_names(model, keep=lambda n: True):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and keep(n)]


def with_lora(model, targets, seed=1, per_slice_alphas=True):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    picks = [n for n in targets if n.endswith(("attn.to_k", "add_v_proj", "proj_mlp", "norm_out.linear"))]
    alpha = {n: a for n, a in zip(picks, (2, 6, 16, 3, 5, 1))} if per_slice_alphas else {}
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern=alpha, target_modules=targets,
                                      init_lora_weights=False))
    return model


def inputs():
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 4, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 12, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([3.0]))


def run(model):
    with torch.no_grad():
        return model(**inputs()).sample


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    base = tiny_flux()
    tuned = with_lora(base, linear_names(base))
    path = tmp_path_factory.mktemp("flux") / "diffusers"
    tuned.save_lora_adapter(str(path))
    adapter = ak.load(path, format="diffusers")
    return base, tuned, adapter


def deltas(adapter):
    return {p: (l.delta_math().double(), l.delta_bias()) for p, l in adapter.layers.items()}


def assert_same(a, b, rtol=1e-6):
    da, db = deltas(a), deltas(b)
    assert set(da) == set(db)
    for p, (w, _) in da.items():
        err = float((db[p][0] - w).norm() / w.norm())
        assert err <= rtol, (p, err)


def test_every_linear_module_has_a_rule(flux):
    base, _, adapter = flux
    assert len(adapter.layers) == len(linear_names(base)) == 30
    orig, rows = to_namespace(adapter, "original", base=base)
    assert {p.partition(".")[0] for p in orig.layers} == {"unet"}
    assert len(orig.layers) == 23 and max(r.error for r in rows) < 1e-6
    assert {r.action for r in rows} == {"rename", "swap", "stack"}


@pytest.mark.parametrize("fmt,options", [("comfyui", {}), ("kohya", {"naming": "original"}), ("ai-toolkit", {}),
                                         ("diffusers", {})])
def test_round_trip_through_each_layout(flux, tmp_path, fmt, options):
    base, _, adapter = flux
    out = ak.save(adapter, tmp_path / "out.safetensors" if fmt != "diffusers" else tmp_path / "out", format=fmt,
                  **options)
    back = ak.load(out, base=base) if fmt == "kohya" else ak.load(out)
    assert back.format == {"ai-toolkit": "diffusers"}.get(fmt, fmt)  # the layout comes from the keys
    assert_same(adapter, ak.load(ak.save(back, tmp_path / "again", format="diffusers")))
    if fmt in ("comfyui", "kohya"):
        keys = load_file(str(out))
        assert any("img_attn.qkv" in k or "img_attn_qkv" in k for k in keys)  # BFL's packed names


def test_block_structure_survives_original_and_back_tensor_exact(flux, tmp_path):
    """One alpha per packed weight: the tensors come back bit-identical; per-slice alphas (the fixture): ΔW to 1e-6."""
    base, _, varied = flux
    orig, _ = to_namespace(varied, "original", base=base)
    assert_same(varied, to_namespace(orig, "diffusers", base=base)[0])
    with_lora(base, linear_names(base), per_slice_alphas=False).save_lora_adapter(str(tmp_path / "u"))
    adapter = ak.load(tmp_path / "u", format="diffusers")
    orig, _ = to_namespace(adapter, "original", base=base)
    back, rows = to_namespace(orig, "diffusers", base=base)
    assert_same(adapter, back)
    for p, layer in adapter.layers.items():
        if p in ("transformer.norm_out.linear", "transformer.proj_out"):  # written with scale 1 (see flux.py)
            continue
        got = back.layers[p]
        assert torch.equal(got.up, layer.up) and torch.equal(got.down, layer.down), p
        assert got.scale == pytest.approx(layer.scale, rel=1e-12)
    assert {r.action for r in rows if "qkv" in r.source or "linear1" in r.source} == {"split:blocks"}


def test_diffusers_loads_what_adaptkit_writes_and_gives_the_peft_outputs(flux, tmp_path):
    base, tuned, adapter = flux
    want = run(tuned)
    for fmt in ("diffusers", "ai-toolkit"):
        out = ak.save(adapter, tmp_path / f"{fmt}.safetensors" if fmt == "ai-toolkit" else tmp_path / fmt, format=fmt)
        sd, meta = diffusers.FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
        assert (meta is None) == (fmt == "ai-toolkit")  # ai-toolkit: no alphas anywhere, the scale is in lora_B
        fresh = copy.deepcopy(base)
        diffusers.FluxPipeline.load_lora_into_transformer(sd, None, transformer=fresh, adapter_name="x", metadata=meta)
        torch.testing.assert_close(run(fresh), want, rtol=1e-4, atol=1e-5)


def test_diffusers_kohya_converter_reads_adaptkit_kohya_files(flux, tmp_path):
    """sd-scripts names (BFL, packed qkv) written by adaptkit, read by diffusers' converter: the same deltas, and the
    same outputs once loaded. The single blocks' linear1 is left out here (diffusers hardcodes its released sizes),
    and the output check uses the blocks only: diffusers 0.42's converter names the embedders and the final layer
    without the ``transformer.`` prefix (``x_embedder.lora_A.weight``), which ``load_lora_into_transformer`` then
    skips."""
    base, tuned, adapter = flux
    double = adapter.replace(layers={p: l for p, l in adapter.layers.items() if "single_transformer_blocks" not in p})
    out = ak.save(double, tmp_path / "k.safetensors", format="kohya", naming="original")
    assert all(k.startswith("lora_unet_") for k in load_file(str(out)))
    sd = diffusers.FluxPipeline.lora_state_dict(str(out))
    for p, layer in double.layers.items():
        key = p if f"{p}.lora_A.weight" in sd else p.partition(".")[2]
        got = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
        torch.testing.assert_close(got, layer.delta_math(), rtol=1e-5, atol=1e-7)
    blocks = double.replace(layers={p: l for p, l in double.layers.items() if ".transformer_blocks." in p})
    ref_sd, meta = diffusers.FluxPipeline.lora_state_dict(str(ak.save(blocks, tmp_path / "d", format="diffusers")),
                                                          return_lora_metadata=True)
    ref = copy.deepcopy(base)
    diffusers.FluxPipeline.load_lora_into_transformer(ref_sd, None, transformer=ref, adapter_name="ref", metadata=meta)
    fresh = copy.deepcopy(base)
    block_sd = {k: v for k, v in sd.items() if ".transformer_blocks." in k}
    diffusers.FluxPipeline.load_lora_into_transformer(block_sd, None, transformer=fresh, adapter_name="x")
    torch.testing.assert_close(run(fresh), run(ref), rtol=1e-4, atol=1e-5)
    assert float((run(fresh) - run(base)).abs().max()) > 1e-2  # the LoRA does change the outputs


def test_diffusers_xlabs_converter_reads_adaptkit_xlabs_files(flux, tmp_path):
    _, _, adapter = flux
    attn = adapter.replace(layers={p: l for p, l in adapter.layers.items()
                                   if ".attn." in p and "single" not in p})
    # attention-only diffusers paths fit Flux.1 and HunyuanVideo (same names and sizes, different original names)
    out = ak.save(attn, tmp_path / "x.safetensors", format="xlabs", arch="flux")
    assert all(".processor." in k for k in load_file(str(out)))
    back = ak.load(out)
    assert back.format == "xlabs"
    sd = diffusers.FluxPipeline.lora_state_dict(str(out))
    for p, layer in attn.layers.items():
        torch.testing.assert_close(sd[f"{p}.lora_B.weight"] @ sd[f"{p}.lora_A.weight"], layer.delta_math(),
                                   rtol=1e-5, atol=1e-7)
    assert_same(attn, ak.load(ak.save(back, tmp_path / "d", format="diffusers")))


def test_xlabs_refuses_layers_it_has_no_name_for(flux, tmp_path):
    _, _, adapter = flux
    with pytest.raises(UnsupportedError, match="XLabs"):
        ak.save(adapter, tmp_path / "x.safetensors", format="xlabs")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ released sizes, state dicts only

H, MLP = 3072, 12288


def _lora(out, inp, r, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LoRA(down=torch.randn(r, inp, generator=g) * 0.1, up=torch.randn(out, r, generator=g) * 0.1,
                alpha=float(alpha or r), shape=(out, inp))


def test_linear1_at_released_sizes_matches_diffusers_converter_both_ways(tmp_path):
    """A trained (dense) sd-scripts linear1 LoRA and a block LoRA stacked by adaptkit from q/k/v/proj_mlp LoRAs with
    different ranks and alphas: diffusers' converter and adaptkit's reading give the same diffusers deltas."""
    members = [_lora(n, H, r, 10 + i, a) for i, (n, r, a) in enumerate([(H, 2, 4), (H, 2, 2), (H, 2, 8), (MLP, 2, 1)])]
    stacked = stack_rows(members, [H, H, H, MLP], H, "linear1")
    assert stacked.rank == 8
    dense = _lora(3 * H + MLP, H, 3, 20, alpha=6)
    names = ["to_q", "to_k", "to_v", "proj_mlp"]
    for name, layer in [("stacked", stacked), ("dense", dense)]:
        orig = ak.Adapter(layers={"unet.single_blocks.0.linear1": layer})
        file = ak.save(orig, tmp_path / f"{name}.safetensors", format="kohya", naming="original")
        sd = diffusers.FluxPipeline.lora_state_dict(str(file))
        mine = ak.load(file)  # resolves against the shipped Flux inventory
        mapped, rows = to_namespace(mine, "diffusers")
        assert {r.action for r in rows} == {"split:blocks" if name == "stacked" else "split:shared"}
        start = 0
        for k, n in zip(names, [H, H, H, MLP]):
            p = f"transformer.single_transformer_blocks.0.{k}" if k == "proj_mlp" else \
                f"transformer.single_transformer_blocks.0.attn.{k}"
            want = layer.delta_math()[start:start + n]
            got_d = sd[f"{p}.lora_B.weight"] @ sd[f"{p}.lora_A.weight"]
            got_a = mapped.layers[p].delta_math()
            torch.testing.assert_close(got_d, want, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(got_a, want, rtol=1e-5, atol=1e-8)
            start += n


def test_final_layer_shift_scale_swap_matches_diffusers():
    layer = _lora(2 * H, H, 2, 30)
    file_sd = {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": layer.down,
               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": layer.up,
               "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(2.0)}
    sd = diffusers.FluxPipeline.lora_state_dict(file_sd)
    mine, _ = to_namespace(ak.Adapter(layers={"unet.final_layer.adaLN_modulation.1": layer}), "diffusers", arch="flux")
    got = mine.layers["transformer.norm_out.linear"].delta_math()
    torch.testing.assert_close(sd["norm_out.linear.lora_B.weight"] @ sd["norm_out.linear.lora_A.weight"], got)


# ------------------------------------------------------------------ block LoRA math and bad inputs


def test_split_of_a_stack_is_exact_with_per_slice_alphas():
    members = [_lora(6, 5, 2, 1, 1.0), None, _lora(6, 5, 3, 2, 12.0)]
    stacked = stack_rows(members, [6, 6, 6], 5, "qkv")
    want = torch.cat([members[0].delta_math(), torch.zeros(6, 5), members[2].delta_math()])
    torch.testing.assert_close(stacked.delta_math(), want)
    parts = split_rows(stacked, [6, 6, 6], "qkv")
    assert parts.method == "blocks" and parts.layers[1] is None
    for m, p in zip(members, parts.layers):
        if m is not None:
            torch.testing.assert_close(p.delta_math(), m.delta_math(), rtol=1e-6, atol=0)
            assert p.rank == m.rank


def test_rows_that_disagree_with_the_model_are_refused(flux):
    base, _, _ = flux
    bad = ak.Adapter(layers={"unet.double_blocks.0.img_attn.qkv": _lora(50, 16, 2, 3)})
    with pytest.raises(UnsupportedError, match="double_blocks.0.img_attn.qkv"):
        to_namespace(bad, "diffusers", base=base)


def test_a_module_no_rule_maps_is_named_and_can_be_dropped(flux):
    base, _, adapter = flux
    extra = adapter.replace(layers={**adapter.layers, "transformer.transformer_blocks.0.norm1.extra": _lora(4, 16, 1, 4)})
    with pytest.raises(CoverageError, match="norm1.extra"):
        to_namespace(extra, "original", arch="flux", base=base)
    out, _ = to_namespace(extra, "original", arch="flux", base=base, drop=["*norm1.extra"])
    assert len(out.layers) == 23
    assert "dropped" in out.metadata["adaptkit.coverage"]


def test_comfyui_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 8, generator=g)},
              str(half))
    with pytest.raises(FormatError, match="img_attn.proj"):
        ak.load(half)
    mixed = tmp_path / "mixed.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(8, 2, generator=g),
               "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": torch.randn(2, 8, generator=g)},
              str(mixed))
    with pytest.raises(FormatError, match="two tensors"):
        ak.load(mixed, format="comfyui")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 8, generator=g),
               "something.else": torch.randn(2, generator=g)}, str(foreign))
    with pytest.raises(FormatError, match="something.else"):
        ak.load(foreign, format="comfyui")


def test_xlabs_bad_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "x.safetensors"
    save_file({"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(2, 8, generator=g),
               "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(24, 3, generator=g)}, str(f))
    with pytest.raises(Exception, match="ranks disagree"):
        ak.load(f)
    s = tmp_path / "s.safetensors"
    save_file({"single_blocks.0.processor.proj_lora.down.weight": torch.randn(2, 8, generator=g),
               "single_blocks.0.processor.proj_lora.up.weight": torch.randn(8, 2, generator=g)}, str(s))
    with pytest.raises(FormatError, match="proj_lora"):
        ak.load(s)


def test_a_file_two_layouts_claim_is_an_error_listing_them(tmp_path, monkeypatch):
    from adaptkit.formats import comfyui, registry

    class Twin:
        NAME = "twin"
        ALLOW_PATTERNS = ["*.safetensors"]

        @staticmethod
        def detect(path):
            return True

    monkeypatch.setitem(registry.FORMATS, "twin", Twin)
    f = tmp_path / "c.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.ones(1, 2),
               "diffusion_model.img_in.lora_B.weight": torch.ones(2, 1)}, str(f))
    assert comfyui.detect(f)
    with pytest.raises(FormatError, match="comfyui, twin"):
        ak.load(f)


def test_cli_converts_kohya_flux_to_diffusers_and_comfyui(flux, tmp_path):
    from .conftest import run_cli

    base, _, adapter = flux
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    src = ak.save(adapter, tmp_path / "k.safetensors", format="kohya", naming="original")
    res = run_cli("convert", "kohya->diffusers", str(src), str(tmp_path / "d"), "--base", str(base_dir), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["coverage"]["energy_share"] == pytest.approx(1.0)
    assert {r["method"] for r in data["layers"]} >= {"split:blocks", "rename", "swap"}
    assert_same(adapter, ak.load(tmp_path / "d"))
    res = run_cli("convert", "->comfyui", str(tmp_path / "d"), str(tmp_path / "c.safetensors"), "--base",
                  str(base_dir))
    assert res.returncode == 0, res.stderr
    comfy = ak.load(tmp_path / "c.safetensors")
    assert comfy.format == "comfyui"
    assert_same(adapter, ak.load(ak.save(comfy, tmp_path / "d2", format="diffusers")))
    res = run_cli("convert", "->comfyui", str(tmp_path / "d"), str(tmp_path / "c.safetensors"), "--base",
                  str(base_dir))
    assert res.returncode == 1 and "exists" in res.stderr


def test_kohya_names_two_models_spell_differently_are_an_error_naming_both(tmp_path, monkeypatch):
    """``lora_unet_double_blocks_0_img_attn_qkv`` is Flux's ``double_blocks.0.img_attn.qkv`` and HunyuanVideo's
    ``double_blocks.0.img_attn_qkv``, at the same shape: without a base that is an error listing both."""
    from adaptkit.formats import names

    invs = {"flux_like": names.Inventory("flux_like", {"unet": {"double_blocks.0.img_attn.qkv": (24, 8)}}),
            "hunyuan_like": names.Inventory("hunyuan_like", {"unet": {"double_blocks.0.img_attn_qkv": (24, 8)}})}
    monkeypatch.setattr(names, "shipped_available", lambda: list(invs))
    monkeypatch.setattr(names, "shipped", lambda n: invs[n])
    f = tmp_path / "k.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(24, 2)}, str(f))
    with pytest.raises(ak.ConfigError, match="flux_like, hunyuan_like"):
        ak.load(f)
    assert list(ak.load(f, base="hunyuan_like").layers) == ["unet.double_blocks.0.img_attn_qkv"]


def test_docs_architecture_table_is_the_generated_one():
    from adaptkit.capabilities import replace_between_markers
    from adaptkit.formats.arch import table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    assert replace_between_markers(doc, table.arch_markdown(), table.START, table.END) == doc, \
        "docs/formats.md's architecture table is stale: run python scripts/doc_tables.py architectures --write"


def test_fuse_a_comfyui_or_kohya_flux_lora_into_a_diffusers_transformer(flux, tmp_path):
    """Original names fused into a diffusers transformer directory: mapped first (qkv split exactly); the fused
    weights equal PEFT's merge of the adapter the file came from."""
    import glob

    base, tuned, adapter = flux
    base.save_pretrained(str(tmp_path / "base"))
    from peft.tuners.lora import LoraLayer

    ref = {}
    for name, module in copy.deepcopy(tuned).named_modules():
        if isinstance(module, LoraLayer):
            module.merge()
            ref[f"{name}.weight"] = module.base_layer.weight.detach()
    for fmt, options in [("comfyui", {}), ("kohya", {"naming": "original"})]:
        src = ak.save(adapter, tmp_path / f"{fmt}.safetensors", format=fmt, **options)
        out = tmp_path / f"fused_{fmt}"
        ak.fuse(tmp_path / "base", src, out)
        fused = load_file(glob.glob(str(out / "*.safetensors"))[0])
        assert set(ref) <= set(fused)
        for k, w in ref.items():
            torch.testing.assert_close(fused[k], w, rtol=1e-5, atol=1e-6)


def test_the_trainers_metadata_decides_between_models_that_spell_names_differently(tmp_path, monkeypatch):
    from adaptkit.formats import names

    invs = {"flux": names.Inventory("flux", {"unet": {"double_blocks.0.img_attn.qkv": (24, 8)}}),
            "hunyuan_video": names.Inventory("hunyuan_video", {"unet": {"double_blocks.0.img_attn_qkv": (24, 8)}})}
    monkeypatch.setattr(names, "shipped_available", lambda: list(invs))
    monkeypatch.setattr(names, "shipped", lambda n: invs[n])
    f = tmp_path / "k.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(24, 2)}, str(f),
              metadata={"ss_base_model_version": "hunyuan_video"})
    assert list(ak.load(f).layers) == ["unet.double_blocks.0.img_attn_qkv"]


def test_a_module_in_both_namespaces_is_an_error(flux):
    base, _, adapter = flux
    orig, _ = to_namespace(adapter, "original", base=base)
    both = orig.replace(layers={**orig.layers, "transformer.x_embedder": adapter.layers["transformer.x_embedder"]})
    with pytest.raises(FormatError, match="transformer.x_embedder"):
        to_namespace(both, "diffusers", base=base)
