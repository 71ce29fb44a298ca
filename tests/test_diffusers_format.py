"""diffusers format and kohya <-> diffusers against real diffusers on a tiny SD pipeline built from configs.

Oracles: a pipeline with adapters injected by peft/diffusers, ``pipe.load_lora_weights`` of adaptkit's
output, and a LyCORIS kohya network (``lycoris.kohya.create_network``, real ``lora_unet_``/``lora_te_``
names) applied to the same tiny UNet and CLIP text encoder.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.formats import load, save

diffusers = pytest.importorskip("diffusers")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()


def tiny_te():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()


def tiny_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_te(), tokenizer=None, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


INPUTS = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
          torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1)))


def outputs(unet, te):
    x, ids = INPUTS
    with torch.no_grad():
        e = te(ids)[0]
        return e, unet(x, 3, encoder_hidden_states=e).sample


def fused(adapter, unet, te):
    """Copies of the components with adaptkit's own math fused in."""
    unet, te = copy.deepcopy(unet), copy.deepcopy(te)
    mods = {f"unet.{n}": m for n, m in unet.named_modules()} | {f"text_encoder.{n}": m for n, m in te.named_modules()}
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            w, b = layer.apply(mods[path].weight, mods[path].bias)
            mods[path].weight.copy_(w)
            if b is not None:
                mods[path].bias.copy_(b)
    return unet, te


def diffusers_saved(tmp_path, metadata=True, legacy=False):
    """An adapter trained-looking (random) with peft on the tiny pipeline, saved by diffusers."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_pipe()
    ucfg = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                      rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 8}, init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    torch.manual_seed(5)
    pipe.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    conv = convert_state_dict_to_diffusers if legacy else dict
    kw = dict(unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict()) if metadata else {}
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=conv(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=conv(get_peft_model_state_dict(pipe.text_encoder)), **kw)
    return tmp_path, pipe


@pytest.mark.parametrize("legacy", [False, True])
def test_diffusers_saved_adapter_loads_and_writes_back(tmp_path, legacy):
    src, pipe = diffusers_saved(tmp_path / "src", legacy=legacy)
    adapter = load(src)
    from safetensors.torch import load_file

    n_a = sum(k.endswith(("lora_A.weight", "down.weight")) for k in load_file(str(src / "pytorch_lora_weights.safetensors")))
    assert adapter.format == "diffusers" and len(adapter) == n_a > 10
    assert adapter["unet.down_blocks.0.resnets.0.conv1"].rank == 2
    assert adapter["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].alpha == 8
    want = outputs(pipe.unet, pipe.text_encoder)
    base_unet, base_te = tiny_unet(), tiny_te()
    assert not torch.allclose(want[1], outputs(base_unet, base_te)[1], atol=1e-4)
    for got, exp in zip(outputs(*fused(adapter, base_unet, base_te)), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    out = save(adapter, tmp_path / "out", format="diffusers")
    written = load_file(str(out / "pytorch_lora_weights.safetensors"))
    te_keys = [k for k in written if k.startswith("text_encoder.")]
    # CLIP tensor names as Hub files, transformers 4 and ComfyUI's key map spell them, whatever transformers names
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    assert set(load(out).layers) == set(adapter.layers)  # and read back under the adapter's own paths
    pipe2 = tiny_pipe()
    pipe2.load_lora_weights(str(out))
    for got, exp in zip(outputs(pipe2.unet, pipe2.text_encoder), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_without_metadata_alpha_is_rank_like_diffusers(tmp_path):
    src, _ = diffusers_saved(tmp_path / "src", metadata=False)
    adapter = load(src)
    assert all(layer.scale == 1.0 for layer in adapter.layers.values())
    ref = tiny_pipe()
    ref.load_lora_weights(str(src))
    for got, exp in zip(outputs(*fused(adapter, tiny_unet(), tiny_te())), outputs(ref.unet, ref.text_encoder)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_old_attention_processor_layout(tmp_path):
    """``processor.to_q_lora.down`` / ``lora_linear_layer`` keys read as the same layers as the current layout."""
    from safetensors.torch import load_file, save_file

    src, _ = diffusers_saved(tmp_path / "src", metadata=False)
    current = load_file(str(src / "pytorch_lora_weights.safetensors"))
    old = {}
    for key, t in current.items():
        module, _, part = key.rpartition(".lora_")
        updown = "down" if part.startswith("A") else "up"
        if module.startswith("unet.") and module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            attn, proj = module.rsplit(".", 1)
            old[f"{attn[5:]}.processor.{proj}_lora.{updown}.weight"] = t  # oldest: no unet. prefix
        elif module.startswith("unet.") and module.endswith("to_out.0"):
            old[f"{module[:-9]}.processor.to_out_lora.{updown}.weight"] = t
        elif module.startswith("unet."):
            old[f"{module}.lora.{updown}.weight"] = t
        else:
            old[f"{module}.lora_linear_layer.{updown}.weight"] = t
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "pytorch_lora_weights.safetensors"))
    a, b = load(src), load(tmp_path / "old", format="diffusers")
    assert set(a.layers) == set(b.layers)
    for p in a.layers:
        torch.testing.assert_close(a[p].delta(), b[p].delta())


PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def kohya_network(tmp_path, te, unet, dim, alpha, **kwargs):
    """``lycoris.kohya.create_network`` with a preset that fits the tiny UNet (LoCon on its convs too)."""
    from lycoris.kohya import create_network

    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    net = create_network(1.0, dim, alpha, None, te, unet, preset=str(preset), **kwargs)
    net.apply_to(te, unet, True, True)
    return net


def _save_base(path, unet, te):
    """A diffusers pipeline directory holding just the two components (weights as safetensors)."""
    path.mkdir()
    unet.save_pretrained(str(path / "unet"))
    te.save_pretrained(str(path / "text_encoder"))
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_kohya_to_diffusers_matches_lycoris_and_round_trips(tmp_path, algo):
    from safetensors.torch import load_file

    unet, te = tiny_unet(), tiny_te()
    base = _save_base(tmp_path / "base", unet, te)
    applied_unet, applied_te = copy.deepcopy(unet), copy.deepcopy(te)
    net = kohya_network(tmp_path, applied_te, applied_unet, 4, 2, algo=algo, conv_dim=2, conv_alpha=1)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    f = tmp_path / "kohya.safetensors"
    net.save_weights(str(f), torch.float32, {"ss_base_model_version": "sd_v1"})
    keys = load_file(str(f))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    assert any(k.startswith(("lora_te_text_model_encoder_layers_0", "lora_te_encoder_layers_0")) for k in keys)
    want = outputs(applied_unet, applied_te)

    adapter = load(f, base=str(base))
    for got, exp in zip(outputs(*fused(adapter, unet, te)), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    if algo != "lora":
        from adaptkit.ops.convert import convert_checkpoint

        with pytest.raises(UnsupportedError, match="--rank"):
            convert_checkpoint("kohya->diffusers", f, tmp_path / "d", base=str(base))
        assert not (tmp_path / "d").exists()
        return
    out = save(adapter, tmp_path / "diffusers", format="diffusers")
    pipe = tiny_pipe()
    pipe.load_lora_weights(str(out))
    for got, exp in zip(outputs(pipe.unet, pipe.text_encoder), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
    back = save(load(out), tmp_path / "back.safetensors", format="kohya")
    again = load_file(str(back))
    assert set(again) == set(keys)
    assert all(torch.equal(again[k], keys[k]) for k in keys)


def test_tiny_kohya_names_need_the_base(tmp_path):
    unet, te = tiny_unet(), tiny_te()
    net = kohya_network(tmp_path, te, unet, 2, 1)
    net.save_weights(str(tmp_path / "k.safetensors"), torch.float32, None)
    with pytest.raises(ConfigError, match="base"):
        load(tmp_path / "k.safetensors")
    assert not list(tmp_path.glob("out*"))


class _Pipe(torch.nn.Module):
    """The two adapted components under their pipeline names, so PEFT paths ``unet.``/``text_encoder.`` fit."""

    def __init__(self, unet, te):
        super().__init__()
        self.unet, self.text_encoder = unet, te


@pytest.mark.parametrize("algo,kwargs", [("lora", {"conv_dim": 2, "conv_alpha": 1}),
                                         ("lora", {"conv_dim": 2, "conv_alpha": 1, "use_tucker": True}),
                                         ("loha", {}), ("lokr", {})])
def test_kohya_names_to_peft_match_lycoris(tmp_path, algo, kwargs):
    """Real ``lora_unet_``/``lora_te_`` files from lycoris.kohya -> PEFT: same outputs as LyCORIS (rtol 1e-4)."""
    from peft import PeftModel

    from adaptkit.ops.convert import convert_checkpoint, plan

    unet, te = tiny_unet(), tiny_te()
    base = _save_base(tmp_path / "base", unet, te)
    applied_unet, applied_te = copy.deepcopy(unet), copy.deepcopy(te)
    net = kohya_network(tmp_path, applied_te, applied_unet, 4, 2, algo=algo, **kwargs)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    f = tmp_path / "kohya.safetensors"
    net.save_weights(str(f), torch.float32, None)
    want = outputs(applied_unet, applied_te)
    assert not plan(load(f, base=str(base)), "peft")  # PEFT can store every layer as it is
    result = convert_checkpoint("kohya->peft", f, tmp_path / "peft", base=str(base))
    assert result.lossless
    model = PeftModel.from_pretrained(_Pipe(unet, te), str(tmp_path / "peft")).eval()
    inner = model.base_model.model
    for got, exp in zip(outputs(inner.unet, inner.text_encoder), want):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
