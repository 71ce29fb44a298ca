"""Chroma: BFL names <-> diffusers' ``ChromaTransformer2DModel``, against diffusers' own converters.

Oracles (none written here): ``ChromaPipeline.lora_state_dict`` (Flux.1's kohya converter, which hardcodes the
released sizes: 19/38 blocks, 3072 wide, so it runs at state-dict level on LoRAs at the released sizes, rank 2, and on
the tiny model only for the modules it does not size); diffusers' checkpoint converter
``convert_chroma_transformer_checkpoint_to_diffusers`` (also 3072-wide) on row probes ``ΔW @ X`` at the released sizes
(the converter only renames and slices rows, which commutes with ``@ X``); ``load_lora_adapter`` on the tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adaptkit as ak
from adaptkit.core.adapter import Adapter
from adaptkit.core.kinds import LoRA
from adaptkit.errors import UnsupportedError
from adaptkit.formats import names
from adaptkit.formats.arch import get_arch
from adaptkit.formats.arch.remap import to_namespace
from tests.arch_models import (
    CHROMA_TINY,
    check_round_trip,
    deltas,
    load_written_diffusers,
    make_case,
    max_rel,
    original_state,
    rel,
    report,
    run_model,
    state_deltas,
    tiny,
    weight_modules,
)

ALPHAS = {"transformer_blocks.0.attn.to_v": 2.0, "single_transformer_blocks.0.proj_mlp": 16.0,
          "distilled_guidance_layer.layers.1.linear_2": 1.0}
#: modules the tiny model cannot run through Flux.1's kohya converter (it sizes linear1 by the released model); the
#: approximator (refused) and final_layer.linear (read without its alpha) are left out of that file too
NOT_KOHYA_TINY = ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                  "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp")


def inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hidden_states=torch.randn(1, 4, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.randint(0, 4, (4, 3), generator=g).float(),
                txt_ids=torch.zeros(3, 3))


def run(model):
    return run_model(model, inputs())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case("ChromaTransformer2DModel", CHROMA_TINY, "ChromaPipeline", tmp_path_factory.mktemp("chroma"),
                     ALPHAS)


@pytest.fixture(scope="module")
def released():
    """Rank-2 LoRAs on double block 0, single block 0, approximator layer 0 and the embedders at Chroma1-HD's sizes
    (from the shipped inventory), in diffusers names; one packed qkv LoRA is a plain (not block) LoRA."""
    listing = names.shipped("chroma").modules["transformer"]
    keep = ("transformer_blocks.0.", "single_transformer_blocks.0.", "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.layers.0.", "distilled_guidance_layer.out_proj", "x_embedder",
            "context_embedder", "proj_out")
    g = torch.Generator().manual_seed(7)
    layers = {}
    for p, shape in listing.items():
        if p.startswith(keep) and len(shape) == 2:
            layers[f"transformer.{p}"] = LoRA(down=torch.randn(2, shape[1], generator=g) / shape[1] ** 0.5,
                                              up=torch.randn(shape[0], 2, generator=g), alpha=3.0, shape=tuple(shape))
    a = Adapter(layers=layers)
    orig, _ = to_namespace(a, "original", arch="chroma")
    plain = LoRA(down=torch.randn(3, 3072, generator=g), up=torch.randn(9216, 3, generator=g), alpha=6.0,
                 shape=(9216, 3072))
    orig = orig.replace(layers={**orig.layers, "unet.double_blocks.0.txt_attn.qkv": plain})
    diff, _ = to_namespace(orig, "diffusers", arch="chroma")
    return dict(orig=orig, diff=diff)


def probe(u: torch.Tensor, v: torch.Tensor, x: dict) -> torch.Tensor:
    n = v.shape[1]
    return u @ (v @ x.setdefault(n, torch.randn(n, 3, generator=torch.Generator().manual_seed(n))))


def test_every_weight_module_maps():
    model = tiny("ChromaTransformer2DModel", CHROMA_TINY)
    arch = get_arch("chroma")
    assert not [n for n in weight_modules(model) if arch.to_original(n) is None]
    # every Linear of the released model maps too: 19 double blocks x 8 + 38 single x 2 + approximator 2 + 5 x 2
    # + 3 embedders = 243 original modules
    inv = names.shipped("chroma").modules
    linears = [p for p, s in inv["transformer"].items() if len(s) == 2]
    assert not [p for p in linears if arch.to_original(p) is None]
    assert len(inv["unet"]) == 243


def test_round_trip_is_exact(case):
    a, orig, back = case["a"], case["orig"], case["back"]
    assert len(a.layers) == len(weight_modules(case["base"])) == 26
    assert set(back.layers) == set(a.layers)
    assert {p for p in orig.layers if "distilled" in p} == {
        "unet.distilled_guidance_layer.in_proj", "unet.distilled_guidance_layer.out_proj",
        *(f"unet.distilled_guidance_layer.layers.{i}.{n}" for i in (0, 1) for n in ("in_layer", "out_layer"))}
    assert orig.layers["unet.single_blocks.0.linear1"].rank == 16  # q, k, v, mlp stacked: 4 + 4 + 4 + 4
    check_round_trip(case, "chroma")


def test_kohya_converter_at_released_sizes(released):
    """sd-scripts ``lora_unet_`` file at Chroma1-HD's sizes -> ChromaPipeline.lora_state_dict (Flux.1's converter)."""
    import diffusers

    orig = released["orig"]
    blocks = orig.replace(layers={p: v for p, v in orig.layers.items() if "distilled" not in p})
    conv = diffusers.ChromaPipeline.lora_state_dict(original_state(blocks, "kohya"))
    x: dict = {}
    got = {k.removeprefix("transformer.")[:-len(".lora_A.weight")]: probe(conv[k.replace("lora_A", "lora_B")], a, x)
           for k, a in conv.items() if k.endswith(".lora_A.weight")}
    want = {p.partition(".")[2]: probe(*layer.factors(), x) for p, layer in released["diff"].layers.items()
            if "distilled" not in p}
    # diffusers' converter takes final_layer's factors without their alpha / rank (its "TODO: alphas"):
    # adaptkit's original names carry that layer with scale 1 (the scale baked into up): read right
    assert orig.layers["unet.final_layer.linear"].scale == 1.0
    assert rel(got.pop("proj_out"), want.pop("proj_out")) < 1e-5
    assert report("chroma (i) kohya converter, released sizes, rel dW probes", max_rel(got, want)) < 1e-5
    # the approximator has no key in diffusers' Flux.1 kohya converter: it refuses the file, naming them
    with pytest.raises(ValueError, match="distilled_guidance_layer"):
        diffusers.ChromaPipeline.lora_state_dict(original_state(orig, "kohya"))


def test_checkpoint_converter_at_released_sizes(released):
    """diffusers' Chroma checkpoint converter on row probes of the BFL-named ΔW == adaptkit's diffusers ΔW probes."""
    from diffusers.loaders.single_file_utils import (
        convert_chroma_transformer_checkpoint_to_diffusers,
    )

    x: dict = {}
    listing = names.shipped("chroma").modules["unet"]
    ckpt = {}
    for p, layer in released["orig"].layers.items():
        name = p.partition(".")[2]
        ckpt[f"{name}.weight"] = probe(*layer.factors(), x)
        ckpt[f"{name}.bias"] = torch.zeros(listing[name][0])
    for n in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
        for q in ("query_norm", "key_norm"):
            ckpt[f"{n}.norm.{q}.scale"] = torch.ones(128)
    ckpt["distilled_guidance_layer.norms.0.scale"] = torch.ones(5120)
    conv = convert_chroma_transformer_checkpoint_to_diffusers(ckpt)
    got = {k[:-len(".weight")]: v for k, v in conv.items() if k.endswith(".weight") and "norm" not in k}
    want = {p.partition(".")[2]: probe(*layer.factors(), x) for p, layer in released["diff"].layers.items()}
    assert report("chroma checkpoint converter, released sizes, rel dW probes", max_rel(got, want)) < 1e-5


def test_kohya_converter_and_diffusers_layout_on_the_tiny_model(case):
    """(ii) on the tiny model: the diffusers-layout round trip, and Flux.1's kohya converter for what it can size."""
    import diffusers

    state = {}
    for p, layer in case["back"].layers.items():
        state[f"{p}.lora_A.weight"] = layer.down
        state[f"{p}.lora_B.weight"] = layer.up * layer.scale
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    out, want = run(fresh), run(case["model"])
    assert report("chroma LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("chroma (ii) diffusers layout, output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)

    orig = case["orig"]
    part = orig.replace(layers={p: v for p, v in orig.layers.items()
                                if "distilled" not in p and not p.endswith(("linear1", "final_layer.linear"))})
    conv = diffusers.ChromaPipeline.lora_state_dict(original_state(part, "kohya"))
    conv = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in conv.items()}
    want = deltas(case["a"], "transformer")
    got = state_deltas(conv)
    assert report("chroma (i) kohya converter, tiny, rel dW", max_rel(got, {k: want[k] for k in got})) < 1e-5
    fresh = copy.deepcopy(case["base"])
    fresh.load_lora_adapter(conv, prefix="transformer", adapter_name="x")
    ref = copy.deepcopy(case["model"])
    with torch.no_grad():
        for name in set(want) - set(got):
            ref.get_submodule(name).lora_B["default"].weight.zero_()
    assert set(want) - set(got) == set(NOT_KOHYA_TINY) | {n for n in want if "distilled" in n} | {"proj_out"}
    out, want = run(fresh), run(ref)
    assert report("chroma LoRA effect on the output", rel(run(case["base"]), want)) > 1e-2
    report("chroma (ii) kohya file (tiny, what fits), output", rel(out, want))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)


def test_bad_inputs(case):
    orig = case["orig"]
    extra = LoRA(down=torch.randn(2, 32), up=torch.randn(32, 2), alpha=2.0, shape=(32, 32))
    odd = orig.replace(layers={**orig.layers, "unet.double_blocks.0.img_mod.lin": extra})  # Flux.1's, not Chroma's
    with pytest.raises(ak.CoverageError, match="img_mod.lin"):
        to_namespace(odd, "diffusers", arch="chroma", base=case["base"])
    kept, _ = to_namespace(odd, "diffusers", arch="chroma", base=case["base"], drop="*img_mod*")
    assert set(kept.layers) == set(case["a"].layers)
    # linear1 rows that fit neither the base (224 = 3 x 32 + 128) nor q, k, v of the input width plus an MLP part
    bad = orig.replace(layers={**orig.layers, "unet.single_blocks.0.linear1":
                               LoRA(down=torch.randn(2, 32), up=torch.randn(90, 2), alpha=2.0, shape=(90, 32))})
    with pytest.raises(UnsupportedError, match="linear1"):
        to_namespace(bad, "diffusers", base=case["base"])


def test_public_api_writes_every_layout(case, released, tmp_path):
    """``ak.save`` to comfyui / kohya (original names) / diffusers, read back by layout detection; diffusers' loaders
    on the written files (kohya and comfyui at the released sizes, which Flux.1's converter hardcodes)."""
    import diffusers
    from safetensors.torch import load_file

    a, orig, base = case["a"], case["orig"], case["base"]
    want_orig = deltas(orig, "unet")
    comfy = ak.save(a, tmp_path / "comfy.safetensors", format="comfyui")
    kohya = ak.save(a, tmp_path / "kohya.safetensors", format="kohya", naming="original")
    diff = ak.save(orig, tmp_path / "diffusers", format="diffusers")
    c, k, d = ak.load(comfy), ak.load(kohya, base=base), ak.load(diff)
    assert (c.format, k.format, d.format) == ("comfyui", "kohya", "diffusers")
    assert report("chroma e2e comfyui read back rel dW", max_rel(deltas(c, "unet"), want_orig)) < 1e-6
    assert report("chroma e2e kohya read back rel dW", max_rel(deltas(k, "unet"), want_orig)) < 1e-6
    got = deltas(d, "transformer")
    assert report("chroma e2e diffusers read back rel dW", max_rel(got, deltas(a, "transformer"))) < 1e-6
    fresh = load_written_diffusers(copy.deepcopy(base), diff, "ChromaPipeline")
    out, ref = run(fresh), run(case["model"])
    report("chroma e2e diffusers file -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    # ai-toolkit: one file, diffusers keys, scales baked (written from the original names: mapped back exactly)
    aitk = ak.save(orig, tmp_path / "aitk.safetensors", format="ai-toolkit")
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(diffusers.ChromaPipeline.lora_state_dict(load_file(str(aitk))), prefix="transformer",
                            adapter_name="x")
    out = run(fresh)
    report("chroma e2e ai-toolkit file -> lora_state_dict -> load_lora_adapter, output", rel(out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)

    # released sizes: the blocks and embedders (diffusers refuses the approximator's keys, see above)
    blocks = released["diff"].replace(layers={p: v for p, v in released["diff"].layers.items() if "distilled" not in p})
    x: dict = {}
    want = {p.partition(".")[2]: probe(*layer.factors(), x) for p, layer in blocks.layers.items()}
    # diffusers reads final_layer's factors without alpha / rank: adaptkit writes that layer with scale 1
    kohya = ak.save(blocks, tmp_path / "kohya_released.safetensors", format="kohya", naming="original", arch="chroma")
    comfy = ak.save(blocks, tmp_path / "comfy_released.safetensors", format="comfyui", arch="chroma")
    # ComfyUI's kohya-style tensor names in the comfyui layout (lora_down/up + alpha) are what Flux.1's loader reads
    comfy_kohya = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
                   for k, v in load_file(str(comfy)).items()}
    for what, state in (("kohya", load_file(str(kohya))), ("comfyui (lora_down/up)", comfy_kohya)):
        conv = diffusers.ChromaPipeline.lora_state_dict(state)
        got = {k.removeprefix("transformer.")[:-len(".lora_A.weight")]: probe(conv[k.replace("lora_A", "lora_B")], v, x)
               for k, v in conv.items() if k.endswith(".lora_A.weight")}
        assert report(f"chroma e2e {what} file at released sizes -> diffusers rel dW probes", max_rel(got, want)) < 1e-5


def test_kohya_files_resolve_without_a_base(tmp_path):
    """A Chroma1-HD kohya file resolves against the shipped inventories by its names and shapes: with approximator
    keys only Chroma's fits; block keys alone fit Flux.1's too, which maps them identically."""
    from safetensors.torch import save_file

    entries = {"lora_unet_distilled_guidance_layer_layers_4_out_layer": (5120, 5120),
               "lora_unet_double_blocks_18_img_attn_qkv": (9216, 3072), "lora_unet_single_blocks_37_linear1": (21504, 3072)}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out, inp) in entries.items():
        state |= {f"{name}.lora_down.weight": torch.randn(2, inp, generator=g),
                  f"{name}.lora_up.weight": torch.randn(out, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)}
    save_file(state, str(tmp_path / "a.safetensors"))
    a = ak.load(tmp_path / "a.safetensors")
    assert a.config["inventory"] == "chroma"
    d, rows = to_namespace(a, "diffusers")
    assert "transformer.distilled_guidance_layer.layers.4.linear_2" in d.layers and len(d.layers) == 1 + 3 + 4
    assert report("chroma kohya file (released sizes) -> diffusers MapRow max error", max(r.error for r in rows)) < 1e-6
