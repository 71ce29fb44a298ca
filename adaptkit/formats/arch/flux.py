"""Flux.1 (dev/schnell): BFL's original module names <-> diffusers' ``FluxTransformer2DModel``.

The map is the one diffusers' ``_convert_kohya_flux_lora_to_diffusers`` applies to sd-scripts files (and ComfyUI's
``flux_to_diffusers`` key map), here in both directions: ``img_attn.qkv`` packs ``to_q``/``to_k``/``to_v``, the
single blocks' ``linear1`` packs ``to_q``/``to_k``/``to_v``/``proj_mlp``, and the final layer's adaptive norm emits
``(shift, scale)`` where diffusers' ``norm_out.linear`` emits ``(scale, shift)``.
"""

from __future__ import annotations

from .base import Arch, Rule

D = "double_blocks.{i}."
T = "transformer_blocks.{i}."
S = "single_blocks.{i}."
ST = "single_transformer_blocks.{i}."

#: the double/single block rules Flux shares with Chroma (which drops the per-block modulation layers)
BLOCK_RULES: tuple[Rule, ...] = (
    Rule(D + "img_attn.qkv", (T + "attn.to_q", T + "attn.to_k", T + "attn.to_v")),
    Rule(D + "img_attn.proj", (T + "attn.to_out.0",)),
    Rule(D + "img_mlp.0", (T + "ff.net.0.proj",)),
    Rule(D + "img_mlp.2", (T + "ff.net.2",)),
    Rule(D + "txt_attn.qkv", (T + "attn.add_q_proj", T + "attn.add_k_proj", T + "attn.add_v_proj")),
    Rule(D + "txt_attn.proj", (T + "attn.to_add_out",)),
    Rule(D + "txt_mlp.0", (T + "ff_context.net.0.proj",)),
    Rule(D + "txt_mlp.2", (T + "ff_context.net.2",)),
    Rule(S + "linear1", (ST + "attn.to_q", ST + "attn.to_k", ST + "attn.to_v", ST + "proj_mlp"),
         sizes=("in", "in", "in", "mlp")),
    Rule(S + "linear2", (ST + "proj_out",)),
)
MODULATION_RULES: tuple[Rule, ...] = (
    Rule(D + "img_mod.lin", (T + "norm1.linear",)),
    Rule(D + "txt_mod.lin", (T + "norm1_context.linear",)),
    Rule(S + "modulation.lin", (ST + "norm.linear",)),
)
EMBEDDER_RULES: tuple[Rule, ...] = (
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    # diffusers' kohya converter drops these modules' alphas ("TODO: alphas"): written with scale 1
    Rule("final_layer.linear", ("proj_out",), scale_one=True),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True, scale_one=True),
)

FLUX = Arch(
    name="flux",
    label="Flux.1",
    model_class="FluxTransformer2DModel",
    config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True),
    rules=BLOCK_RULES + MODULATION_RULES + EMBEDDER_RULES,
    pipeline="FluxPipeline",
    layouts=("diffusers", "kohya", "comfyui", "xlabs", "ai-toolkit"),
    text_encoders=("text_encoder", "text_encoder_2"),
    extra={"diffusers_reads": ("diffusers", "kohya", "xlabs", "ai-toolkit")},
    notes="diffusers `_convert_kohya_flux_lora_to_diffusers`, `_convert_xlabs_flux_lora_to_diffusers`; ComfyUI "
          "`comfy/utils.py` `flux_to_diffusers`",
)

__all__ = ["BLOCK_RULES", "EMBEDDER_RULES", "FLUX", "MODULATION_RULES"]
