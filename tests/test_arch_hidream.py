"""HiDream-I1: the module map against a tiny ``HiDreamImageTransformer2DModel`` (MoE feed-forwards included) and
diffusers' own converter.

The original names are diffusers' names; only the file prefix differs (``diffusion_model.`` vs ``transformer.``).
The tiny model keeps HiDream's structure: one double and one single stream block, each with a routed MoE
feed-forward of 2 experts (top-1) plus the shared expert, the double block's text feed-forward ``ff_t``, the per-block
caption projections. No weight is packed, so there is no fused layer whose rows could disagree with the base.
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

ARCH = ARCHS["hidream"]
CFG = dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
           caption_channels=[8, 6], text_emb_dim=10, num_routed_experts=2, num_activated_experts=1,
           axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1])
#: per-module alphas: single experts, a whole projection family, the text stream's q
ALPHAS = {"experts.1.w2": 2.0, "shared_experts.w3": 16.0, "to_q_t": 4.0, "adaLN_modulation.1": 3.0}
EXPERTS = [f"{blk}.0.block.ff_i.{e}.{w}" for blk in ("double_stream_blocks", "single_stream_blocks")
           for e in ("experts.0", "experts.1", "shared_experts") for w in ("w1", "w2", "w3")]


def tiny():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    return HiDreamImageTransformer2DModel(**CFG).eval()


def forward(model):
    g = torch.Generator().manual_seed(3)
    kw = dict(hidden_states=torch.randn(1, 4, 4, 4, generator=g), timesteps=torch.tensor([500]),
              encoder_hidden_states_t5=torch.randn(1, 3, 8, generator=g),
              encoder_hidden_states_llama3=torch.randn(2, 1, 3, 6, generator=g),
              pooled_embeds=torch.randn(1, 10, generator=g))
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny()
    model = copy.deepcopy(base)
    a = peft_adapter(model, tmp_path_factory.mktemp("hidream") / "a", ARCH.pipeline, alpha_pattern=ALPHAS)
    return base, model, a


def test_rules_cover_every_module(setup):
    base, _, a = setup
    assert coverage_gaps(ARCH, base) == []
    targets = lora_targets(base)
    assert len(a.layers) == len(targets) == 45 and all(e in targets for e in EXPERTS)
    assert all(ARCH.to_original(p)[1] == p for p in targets)
    unet = names.shipped("hidream").modules["unet"]
    assert tuple(unet["double_stream_blocks.15.block.ff_i.experts.3.w1"]) == (6912, 2560)
    assert tuple(unet["single_stream_blocks.31.block.ff_i.shared_experts.w2"]) == (2560, 3584)
    assert tuple(unet["caption_projection.48.linear"]) == (2560, 4096)
    assert sum(".ff_i.experts." in p for p in unet) == (16 + 32) * 4 * 3


def test_kohya_names_resolve_uniquely():
    """Every HiDream module's flattened (kohya/LyCORIS) name resolves to that one module of the shipped inventory."""
    inv = names.shipped("hidream")
    flats = {("unet", names.flatten(p)): p for p in inv.modules["unet"]}
    res = names.resolve_names(list(flats), base=inv)
    assert {k: v[0] for k, v in res.paths.items()} == flats


def test_round_trip(setup):
    base, _, a = setup
    fig = round_trip(a, base)
    print("hidream round trip", fig)
    assert fig["original_layers"] == 45 and fig["stacked"] == 0 and fig["tensors_equal"] == 45
    assert fig["delta"] == 0.0 and fig["row_original"] == 0.0 and fig["row_diffusers"] == 0.0


def test_oracle_converter_tiny(setup):
    """(c i) diffusers' converter output per module (experts included) equals adaptkit's diffusers namespace."""
    from diffusers import HiDreamImagePipeline

    base, _, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    converted = HiDreamImagePipeline.lora_state_dict(original_state_dict(orig))
    bad = oracle_mismatches(converted, a)
    worst = bad.pop("")
    print("hidream oracle: worst agreeing error", worst, "disagree:", bad)
    assert bad == {}


def test_oracle_outputs(setup):
    """(c ii) load_lora_adapter of the converted file on a fresh tiny model == the PEFT model, every module adapted."""
    from diffusers import HiDreamImagePipeline

    base, model, a = setup
    orig, _ = to_namespace(a, "original", base=base)
    fresh = load_converted(base, HiDreamImagePipeline.lora_state_dict(original_state_dict(orig)))
    want, got, plain = forward(model), forward(fresh), forward(base)
    print("hidream outputs: rel error", rel(got, want), "adapter effect", rel(want, plain))
    assert rel(want, plain) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unmapped_path_and_drop(setup):
    base, _, a = setup
    extra = next(iter(a.layers.values()))
    bad = a.replace(layers={**a.layers, "transformer.pe_embedder.proj": extra})
    with pytest.raises(CoverageError, match=r"pe_embedder\.proj"):
        to_namespace(bad, "original", base=base)
    out, _ = to_namespace(bad, "original", base=base, drop="transformer.pe_embedder.*")
    assert len(out.layers) == 45


# ------------------------------------------------------------------ the public API (ak.save / ak.load)


def test_written_layouts(setup, tmp_path):
    """comfyui / kohya (original names) / diffusers files written by ak.save read back (layout detected) to the same
    ΔW; the diffusers file loads in diffusers and gives the PEFT model's outputs."""
    base, model, a = setup
    fig = written_round_trips(a, base, tmp_path)
    fresh = diffusers_loaded(base, ARCH.pipeline, fig.pop("paths")["diffusers"])
    err = rel(forward(fresh), forward(model))
    print("hidream written layouts: max ΔW error", fig, "diffusers file outputs", err)
    assert max(fig.values()) < 1e-6
    torch.testing.assert_close(forward(fresh), forward(model), rtol=1e-4, atol=1e-5)


def test_written_comfyui_file_in_diffusers(setup, tmp_path):
    """The comfyui file adaptkit writes, read by diffusers' own converter: diffusers ignores ``alpha`` keys, and adaptkit
    writes none (the scale is baked into lora_B), so both a scale-1 adapter and one with other alphas read right."""
    from diffusers import HiDreamImagePipeline
    from safetensors.torch import load_file

    base, model, a = setup
    unit = copy.deepcopy(base)
    b = peft_adapter(unit, tmp_path / "unit", ARCH.pipeline, alpha=4.0, seed=4)
    path = ak.save(b, tmp_path / "c", format="comfyui", base=base)
    fresh = load_converted(base, HiDreamImagePipeline.lora_state_dict(load_file(str(path))))
    torch.testing.assert_close(forward(fresh), forward(unit), rtol=1e-4, atol=1e-5)
    path = ak.save(a, tmp_path / "c2", format="comfyui", base=base)
    assert not any(k.endswith(".alpha") for k in load_file(str(path)))
    err = rel(forward(load_converted(base, HiDreamImagePipeline.lora_state_dict(load_file(str(path))))), forward(model))
    print("hidream comfyui file (other alphas, scale baked) in diffusers: output rel", err)
    assert err < 1e-4
