"""Generate the module inventories shipped in ``adaptkit/data/inventories`` (SD 1.x, SDXL and every ``ARCHS`` row).

Each model is built from its published architecture config **on the meta device** (no weights, no
downloads): diffusers ``UNet2DConditionModel`` and each ``ARCHS`` row's transformer class
and transformers CLIP / T5 text encoders. The original (non-diffusers) names kohya trainers use are
added from the architectures' rules: LDM ``input_blocks``/``middle_block``/``output_blocks`` names as
aliases of the UNet's diffusers names, and the original module lists of the diffusion transformers under the
``unet`` component (sd-scripts and musubi-tuner write those with ``lora_unet_``): every ``adaptkit.formats.arch.ARCHS``
row's (SD3/SD3.5, Flux.1, Flux.2, Chroma, ...) from its module map (its config gives the diffusers ``transformer``).

Run: ``python scripts/make_inventories.py`` (takes a few seconds).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "adaptkit" / "data" / "inventories"

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def listing(model: torch.nn.Module) -> tuple[dict[str, list[int]], list[str]]:
    mods, biases = {}, []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if name and isinstance(w, torch.Tensor):
            mods[name] = list(w.shape)
            if getattr(mod, "bias", None) is not None:
                biases.append(name)
    return mods, biases


def build(factory) -> tuple[dict[str, list[int]], list[str]]:
    with torch.device("meta"):
        return listing(factory())


def clip(cfg: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return lambda: cls(CLIPTextConfig(**cfg))


def t5():
    from transformers import T5Config, T5EncoderModel

    return lambda: T5EncoderModel(T5Config(**T5_XXL))


def unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel(**cfg)


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_name(path: str, lpb: int, up_has_attn: list[bool]) -> str | None:
    """The LDM (original SD) name of a diffusers UNet module path."""
    if path in TOP:
        return TOP[path]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path)
    if m:
        side, b, part, i, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if side == "down":
            if part == "downsamplers":
                return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op"
            idx = 1 + b * (lpb + 1) + i
        else:
            if part == "upsamplers":
                return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if up_has_attn[b] else 1}.conv"
            idx = b * (lpb + 1) + i
        block = "input_blocks" if side == "down" else "output_blocks"
        if part == "resnets":
            return f"{block}.{idx}.0.{RESNET.get(rest, rest)}"
        return f"{block}.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", path)
    if m:
        part, i, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets":
            return f"middle_block.{0 if i == 0 else 2}.{RESNET.get(rest, rest)}"
        return f"middle_block.1.{rest}"
    return None


def ldm_aliases(mods: dict[str, list[int]], cfg: dict) -> dict[str, str]:
    up_types = cfg.get("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    has_attn = ["CrossAttn" in t for t in up_types]
    out = {}
    for p in mods:
        name = ldm_name(p, cfg.get("layers_per_block", 2), has_attn)
        if name is not None:
            out[name] = p
    return out


def write(name: str, components: dict, aliases: dict | None = None) -> None:
    from adaptkit.formats.names import text_model_aliases

    modules = {c: m for c, (m, _) in components.items()}
    aliases = dict(aliases or {})
    for comp, mods in modules.items():
        if comp.startswith("text_encoder") and (extra := text_model_aliases(mods)):
            aliases[comp] = extra
    biases = {c: sorted(b) for c, (_, b) in components.items() if b is not None}
    data = {"name": name, "modules": modules, "aliases": aliases or {}, "biases": biases}
    OUT.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    (OUT / f"{name}.json.gz").write_bytes(gzip.compress(raw, 9, mtime=0))
    print(f"{name}: {sum(len(m) for m in modules.values())} modules, {len((aliases or {}).get('unet', {}))} aliases, "
          f"{(OUT / f'{name}.json.gz').stat().st_size} bytes")


def arch_components(arch) -> dict:
    """``transformer`` (diffusers names, built from the row's config on the meta device) and ``unet`` (the original
    names, derived from the row's module map) of an ``ARCHS`` row."""
    import diffusers

    from adaptkit.formats.arch import original_listing

    cls = getattr(diffusers, arch.model_class)
    mods, biases = build(lambda: cls(**arch.config))
    orig = original_listing(arch, {p: tuple(s) for p, s in mods.items()})
    orig_biases = [p for p in orig if any(m in biases for m in arch.to_diffusers(p)[1])]
    return {"transformer": (mods, biases), "unet": ({p: list(s) for p, s in orig.items()}, orig_biases)}


#: text encoders LoRAs for an architecture touch, per ``ARCHS`` row (component -> model factory)
def text_encoders(name: str) -> dict:
    sd3 = {"text_encoder": clip(CLIP_L, True), "text_encoder_2": clip(CLIP_G, True), "text_encoder_3": t5()}
    return {"flux": {"text_encoder": clip(CLIP_L, False), "text_encoder_2": t5()}, "sd3": sd3,
            "sd35_medium": sd3, "sd35_large": sd3}.get(name, {})


def main() -> None:
    from adaptkit.formats.arch import ARCHS

    sd15 = build(unet(SD15_UNET))
    write("sd15", {"unet": sd15, "text_encoder": build(clip(CLIP_L, False))},
          {"unet": ldm_aliases(sd15[0], SD15_UNET)})
    sdxl = build(unet(SDXL_UNET))
    write("sdxl", {"unet": sdxl, "text_encoder": build(clip(CLIP_L, False)), "text_encoder_2": build(clip(CLIP_G, True))},
          {"unet": ldm_aliases(sdxl[0], SDXL_UNET)})
    for arch in ARCHS.values():
        comps = arch_components(arch)
        comps.update({c: build(f) for c, f in text_encoders(arch.name).items()})
        write(arch.name, comps)


if __name__ == "__main__":
    main()
