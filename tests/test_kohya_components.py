"""kohya output of adapters made on a bare model (PEFT on a diffusers ``UNet2DConditionModel`` alone, ...).

Their module paths carry no pipeline component (``down_blocks.0...``); kohya-based tools want them under
``lora_unet_`` / ``lora_te_`` / ``lora_transformer_``. Oracles: PEFT itself (``PeftModel`` outputs), diffusers'
``load_lora_weights`` on a tiny SD pipeline and its kohya Flux conversion function, and LyCORIS's kohya loader
(``lycoris.kohya.create_network_from_weights``).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.errors import ConfigError
from adaptkit.ops.convert import convert_checkpoint

from .conftest import lycoris_network, make_peft_adapter, make_tiny_llama

pytest.importorskip("diffusers")
from .test_diffusers_format import tiny_pipe, tiny_te, tiny_unet

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
CTX = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(2))
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_out(unet):
    with torch.no_grad():
        return unet(X, 3, encoder_hidden_states=CTX).sample


def te_out(te):
    with torch.no_grad():
        return te(IDS)[0]


def peft_on(model, path, targets, seed=3, r=4, alpha=2):
    """A PEFT LoRA (random, non-zero) on a bare model, saved with ``save_pretrained``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                   init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(path))
    return peft_model


def lycoris_kohya_applied(file, unet=None, te=None):
    """Copies of the models with the kohya file applied by LyCORIS's kohya loader (real ``lora_unet_``/``lora_te_``)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    unet, te = copy.deepcopy(unet), copy.deepcopy(te)
    holder = None
    if te is not None:  # sd-scripts names CLIP modules text_model.encoder...: give the bare encoder that parent
        holder = torch.nn.Module()
        holder.text_model = te
    LycorisNetworkKohya.apply_preset({"enable_conv": False, "unet_target_module": ["Transformer2DModel"],
                                      "unet_target_name": [], "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
                                      "text_encoder_target_name": []})
    net, sd = create_network_from_weights(1.0, str(file), None, holder, unet if unet is not None else torch.nn.Module(),
                                          for_inference=True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len({k.split(".")[0] for k in sd})
    net.apply_to(holder, unet, holder is not None, unet is not None)
    assert not net.load_state_dict(sd, strict=False).unexpected_keys
    return unet, te


def assert_same_deltas(got, peft_dir, prefix):
    want = ak.load(peft_dir)
    assert set(got.layers) == {f"{prefix}.{p}" for p in want.layers}
    for p, layer in want.layers.items():
        torch.testing.assert_close(got[f"{prefix}.{p}"].delta(), layer.delta())


@pytest.mark.parametrize("how", ["detected", "cli --component unet"])
def test_bare_unet_peft_adapter_gets_lora_unet_names(tmp_path, how):
    unet = tiny_unet()
    peft_model = peft_on(unet, tmp_path / "peft", UNET_TARGETS)
    assert all(p.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for p in ak.load(tmp_path / "peft").layers)
    out = tmp_path / "kohya.safetensors"
    if how == "detected":
        convert_checkpoint("peft->kohya", tmp_path / "peft", out)
    else:
        r = CliRunner().invoke(main, ["convert", "peft->kohya", str(tmp_path / "peft"), str(out), "--component", "unet"])
        assert r.exit_code == 0, r.output
    keys = load_file(str(out))
    assert keys and all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
                        for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    want = unet_out(peft_model)
    assert not torch.allclose(want, unet_out(unet), atol=1e-3)

    assert_same_deltas(ak.load(out, base=unet), tmp_path / "peft", "unet")
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(unet_out(pipe.unet), want, rtol=1e-4, atol=1e-5)
    lyco_unet, _ = lycoris_kohya_applied(out, unet=unet)
    torch.testing.assert_close(unet_out(lyco_unet), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("component,prefix", [(None, "lora_te_"), ("text_encoder_2", "lora_te2_")])
def test_bare_clip_text_encoder_gets_lora_te_names(tmp_path, component, prefix):
    te = tiny_te()
    peft_model = peft_on(te, tmp_path / "peft", ["q_proj", "v_proj", "fc1"], r=2, alpha=4)
    out = ak.save(ak.load(tmp_path / "peft"), tmp_path / "k.safetensors", format="kohya", component=component)
    keys = load_file(str(out))
    assert all(k.startswith(prefix + "text_model_encoder_layers_") for k in keys)  # sd-scripts' CLIP names
    want = te_out(peft_model)
    assert not torch.allclose(want, te_out(te), atol=1e-3)
    got = ak.load(out, base=te)
    assert_same_deltas(got, tmp_path / "peft", component or "text_encoder")
    if component is None:
        _, lyco_te = lycoris_kohya_applied(out, te=te)
        torch.testing.assert_close(te_out(lyco_te), want, rtol=1e-4, atol=1e-5)


def test_bare_flux_transformer_gets_lora_transformer_names(tmp_path):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)).eval()
    # attention only: diffusers' converter maps no other module inside the blocks (proj_mlp lands on the block)
    peft_on(flux, tmp_path / "peft", ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"], r=2, alpha=4)
    peft = ak.load(tmp_path / "peft")
    out = ak.save(peft, tmp_path / "k.safetensors", format="kohya")
    keys = load_file(str(out))
    assert all(k.startswith(("lora_transformer_transformer_blocks_0_", "lora_transformer_single_transformer_blocks_0_"))
               for k in keys)
    assert_same_deltas(ak.load(out, base=flux), tmp_path / "peft", "transformer")
    converted = _convert_kohya_flux_lora_to_diffusers(dict(keys))  # diffusers folds alpha / rank into lora_A
    assert len(converted) == 2 * len(peft)
    for p, layer in peft.layers.items():
        a, b = converted[f"transformer.{p}.lora_A.weight"], converted[f"transformer.{p}.lora_B.weight"]
        torch.testing.assert_close(b @ a, layer.delta(), rtol=1e-5, atol=1e-6)


def test_bare_component_detection():
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from adaptkit.formats.names import bare_component

    def paths(model, leaf=("to_q", "q_proj", "fc1", "proj_out", "conv_in")):
        return [n for n, _ in model.named_modules() if n.endswith(leaf)]

    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    clip_proj = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           max_position_embeddings=16, projection_dim=8))
    assert bare_component(paths(tiny_unet())) == "unet"
    assert bare_component(paths(sd3)) == "transformer"
    assert bare_component(paths(tiny_te())) == "text_encoder"
    assert bare_component(paths(clip_proj)) == "text_encoder"
    assert bare_component(paths(make_tiny_llama())) is None
    assert bare_component(["encoder.layers.0.attention.q_proj"]) is None  # wav2vec2-like, not CLIP
    assert bare_component(["down_blocks.0.attentions.0.to_q", "controlnet_down_blocks.0"]) is None  # ControlNet


def test_other_bare_models_and_lycoris_sources_keep_lycoris_names(tmp_path):
    pytest.importorskip("lycoris")
    from peft import LoraConfig

    make_peft_adapter(tmp_path / "llama", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    f = ak.save(ak.load(tmp_path / "llama"), tmp_path / "llama.safetensors", format="kohya")
    assert all(k.startswith("lycoris_model_layers_") for k in load_file(str(f)))

    unet = tiny_unet()
    peft_on(unet, tmp_path / "peft", UNET_TARGETS)
    f = ak.save(ak.load(tmp_path / "peft"), tmp_path / "forced.safetensors", format="kohya", component="lycoris")
    assert all(k.startswith(("lycoris_down_blocks_", "lycoris_up_blocks_", "lycoris_mid_block_"))
               for k in load_file(str(f)))

    # a real LyCORIS network on the bare UNet names its modules lycoris_down_blocks_...: writing it again keeps them
    applied = copy.deepcopy(unet)
    net = lycoris_network(applied, ["Linear"], linear_dim=2, linear_alpha=1, algo="lora")
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    src = load_file(str(tmp_path / "lyco.safetensors"))
    assert any(k.startswith("lycoris_down_blocks_0_attentions_0_") for k in src)
    back = ak.save(ak.load(tmp_path / "lyco.safetensors", base=unet), tmp_path / "back.safetensors", format="kohya")
    assert set(load_file(str(back))) == set(src)


def test_component_option_errors(tmp_path):
    unet = tiny_unet()
    peft_on(unet, tmp_path / "peft", UNET_TARGETS)
    adapter = ak.load(tmp_path / "peft")
    with pytest.raises(ConfigError, match="unknown kohya component 'vae'"):
        ak.save(adapter, tmp_path / "a.safetensors", format="kohya", component="vae")
    # PEFT output selects a component of a pipeline adapter; these bare paths are no component's
    with pytest.raises(ConfigError, match="no unet layers .*name no pipeline component"):
        ak.save(adapter, tmp_path / "p", format="peft", component="unet")
    with pytest.raises(ConfigError, match="belong to none"):
        ak.save(adapter, tmp_path / "p", format="peft", component="each")
    with pytest.raises(ConfigError, match="kohya and PEFT output only, not diffusers"):
        convert_checkpoint("peft->diffusers", tmp_path / "peft", tmp_path / "d", component="unet")
    with pytest.raises(ConfigError, match="does not apply to 'pissa->lora'"):
        convert_checkpoint("pissa->lora", tmp_path / "peft", tmp_path / "d", component="unet")
    runner = CliRunner()
    r = runner.invoke(main, ["merge", str(tmp_path / "peft"), "-o", str(tmp_path / "m"), "--component", "unet"])
    assert r.exit_code == 1 and "no unet layers" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["merge", str(tmp_path / "peft"), str(tmp_path / "peft"), "--format", "kohya",
                             "-o", str(tmp_path / "m.safetensors"), "--component", "unet"])
    assert r.exit_code == 0, r.output
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "m.safetensors")))
    assert not any((tmp_path / n).exists() for n in ("a.safetensors", "p", "d", "m"))


# ------------------------------------------------------------------- PEFT output for one bare component


def kohya_unet_file(tmp_path, unet):
    """A kohya ``lora_unet_`` LoRA for ``unet`` (adaptkit's kohya writer from a real PEFT LoRA); returns
    ``(file, output of the adapter applied directly by PEFT)``."""
    peft_model = peft_on(unet, tmp_path / "src_peft", UNET_TARGETS)
    f = tmp_path / "unet_lora.safetensors"
    convert_checkpoint("peft->kohya", tmp_path / "src_peft", f)
    assert all(k.startswith("lora_unet_") for k in load_file(str(f)))
    return f, unet_out(peft_model)


def test_kohya_unet_lora_to_peft_for_a_bare_unet_base(tmp_path):
    """`convert 'lycoris->peft' unet_lora.safetensors OUT --base ./unet`: PeftModel.from_pretrained(unet, OUT) works."""
    from peft import PeftModel

    unet = tiny_unet()
    unet.save_pretrained(str(tmp_path / "unet"))  # a bare UNet2DConditionModel directory
    f, want = kohya_unet_file(tmp_path, unet)
    assert not torch.allclose(want, unet_out(unet), atol=1e-3)
    r = CliRunner().invoke(main, ["convert", "lycoris->peft", str(f), str(tmp_path / "out"), "--base", str(tmp_path / "unet")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], list) else [cfg["target_modules"]]
    assert not any("unet" in t for t in targets)
    assert not any("unet." in k for k in load_file(str(tmp_path / "out" / "adapter_model.safetensors")))
    model = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "out")).eval()
    torch.testing.assert_close(unet_out(model), want, rtol=1e-4, atol=1e-5)
    # and the same file applied by LyCORIS's kohya loader
    lyco_unet, _ = lycoris_kohya_applied(f, unet=unet)
    torch.testing.assert_close(unet_out(model), unet_out(lyco_unet), rtol=1e-4, atol=1e-5)
    # back to kohya: the lora_unet_ names again
    back = ak.save(ak.load(tmp_path / "out"), tmp_path / "back.safetensors", format="kohya")
    assert set(load_file(str(back))) == set(load_file(str(f)))


def test_pipeline_lora_to_peft_per_component(tmp_path):
    """unet + text encoder in one kohya file: --component C writes C's PEFT adapter, each writes one per component."""
    from peft import PeftModel

    from .test_diffusers_format import _save_base

    unet, te = tiny_unet(), tiny_te()
    pipe = _save_base(tmp_path / "pipe", unet, te)
    peft_unet = peft_on(unet, tmp_path / "pu", UNET_TARGETS)
    peft_te = peft_on(te, tmp_path / "pt", ["q_proj", "v_proj", "fc1"], r=2, alpha=4)
    layers = {f"unet.{p}": l for p, l in ak.load(tmp_path / "pu").layers.items()}
    layers |= {f"text_encoder.{p}": l for p, l in ak.load(tmp_path / "pt").layers.items()}
    f = ak.save(ak.load(tmp_path / "pu").replace(layers=layers), tmp_path / "pipe_lora.safetensors", format="kohya")
    assert {k.split("_")[1] for k in load_file(str(f))} == {"unet", "te"}
    runner = CliRunner()

    # no --component: the paths keep their components, and the output says how to get one model's adapter
    r = runner.invoke(main, ["convert", "kohya->peft", str(f), str(tmp_path / "all"), "--base", str(pipe)])
    assert r.exit_code == 0, r.output
    note = r.output.split("note", 1)[1].split("\n", 1)[0]
    assert "--component text_encoder" in note and "--component each" in note and "--to diffusers" in note, note
    assert {p.partition(".")[0] for p in ak.load(tmp_path / "all").layers} == {"unet", "text_encoder"}

    r = runner.invoke(main, ["convert", "kohya->peft", str(f), str(tmp_path / "each"), "--base", str(pipe),
                             "--component", "each"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["text_encoder", "unet"]
    got_unet = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "each" / "unet")).eval()
    got_te = PeftModel.from_pretrained(copy.deepcopy(te), str(tmp_path / "each" / "text_encoder")).eval()
    torch.testing.assert_close(unet_out(got_unet), unet_out(peft_unet), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(te_out(got_te), te_out(peft_te), rtol=1e-4, atol=1e-5)
    assert ak.load(f"{tmp_path / 'each'}:unet").kinds == {"lora"}

    result = convert_checkpoint("kohya->peft", f, tmp_path / "te", base=str(pipe), component="text_encoder")
    assert set(result.report["module"]) == set(ak.load(tmp_path / "pt").layers)  # the report lists what is written
    got_te = PeftModel.from_pretrained(copy.deepcopy(te), str(tmp_path / "te")).eval()
    torch.testing.assert_close(te_out(got_te), te_out(peft_te), rtol=1e-4, atol=1e-5)
    assert "text_encoder" in result.note
    # its kohya names come back from the PEFT adapter alone
    back = load_file(str(ak.save(ak.load(tmp_path / "te"), tmp_path / "te.safetensors", format="kohya")))
    assert set(back) == {k for k in load_file(str(f)) if k.startswith("lora_te_")}
    # that text-encoder-only file with the bare model as base (an nn.Module): PEFT in the model's own namespace
    convert_checkpoint("kohya->peft", tmp_path / "te.safetensors", tmp_path / "te2", base=te)
    got_te = PeftModel.from_pretrained(copy.deepcopy(te), str(tmp_path / "te2")).eval()
    torch.testing.assert_close(te_out(got_te), te_out(peft_te), rtol=1e-4, atol=1e-5)

    with pytest.raises(ConfigError, match="no transformer layers .*text_encoder, unet"):
        convert_checkpoint("kohya->peft", f, tmp_path / "x", base=str(pipe), component="transformer")
    with pytest.raises(ConfigError, match="unknown PEFT component 'vae'"):
        convert_checkpoint("kohya->peft", f, tmp_path / "x", base=str(pipe), component="vae")
    assert not (tmp_path / "x").exists()
