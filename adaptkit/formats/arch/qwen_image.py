"""Qwen-Image: the original module names are diffusers' ``QwenImageTransformer2DModel`` names.

Qwen-Image was released in diffusers' layout, and ComfyUI's native model (``comfy/ldm/qwen_image/model.py``) keeps
those names (``transformer_blocks.{i}.attn.to_q``, ``img_mod.1``, ``img_mlp.net.0.proj``, ``norm_out.linear``, ...),
including the final norm's ``(scale, shift)`` order, so every rule is the identity and only the file prefixes differ
(``diffusion_model.`` for ComfyUI / ai-toolkit, ``lora_unet_`` + flattened names for musubi-tuner / kohya,
``transformer.`` for diffusers). The rules name each module rather than one ``Rule("{path}", ("{path}",))``: a
module Qwen-Image does not have is then a coverage error naming it, and the row does not claim other architectures'
paths when an adapter's architecture is detected from its module names.

Sources: diffusers 0.42 ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_qwen_lora_to_diffusers``
(strips ``diffusion_model.``/``lora_unet_``/``default.``, un-flattens kohya names with its list of protected
n-grams, bakes ``alpha / rank`` into the factors); ``loaders/lora_pipeline.py`` ``QwenImageLoraLoaderMixin``;
ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (``QwenImage``: ``<name>``, ``transformer.<name>`` and
``diffusion_model.<name>`` all map to the native ``diffusion_model.<name>``).
"""

from __future__ import annotations

from .base import Arch, Rule

T = "transformer_blocks.{i}."

_NAMES = (
    *(T + m for m in (
        "img_mod.1", "txt_mod.1",
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )),
    "img_in", "txt_in", "txt_norm",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.addition_t_embedding",  # Qwen-Image-Layered (use_additional_t_cond)
    "norm_out.linear", "proj_out",
)
RULES: tuple[Rule, ...] = tuple(Rule(n, (n,)) for n in _NAMES)

QWEN_IMAGE = Arch(
    name="qwen_image",
    label="Qwen-Image",
    model_class="QwenImageTransformer2DModel",
    # Qwen/Qwen-Image transformer/config.json (the class defaults; Qwen-Image-Edit shares it)
    config=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    rules=RULES,
    pipeline="QwenImagePipeline",
    layouts=("diffusers", "kohya", "comfyui"),
    extra={"diffusers_reads": ("diffusers", "kohya", "comfyui")},
    notes="diffusers `_convert_non_diffusers_qwen_lora_to_diffusers`; ComfyUI `comfy/lora.py` "
          "`model_lora_keys_unet` (QwenImage: names as in diffusers); musubi-tuner/ai-toolkit train the transformer "
          "only (not Qwen2.5-VL)",
)

__all__ = ["QWEN_IMAGE", "RULES"]
