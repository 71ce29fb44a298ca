"""Flux.2 (dev): BFL's original module names <-> diffusers' ``Flux2Transformer2DModel``.

Sources (read, not copied), diffusers 0.42.1:

* ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_flux2_lora_to_diffusers`` (ai-toolkit / ComfyUI
  ``diffusion_model.`` files) and ``_convert_kohya_flux2_lora_to_diffusers`` (sd-scripts / musubi-tuner
  ``lora_unet_`` files), both read by ``Flux2Pipeline.lora_state_dict``;
* ``loaders/single_file_utils.py`` ``convert_flux2_transformer_checkpoint_to_diffusers`` (the released BFL
  checkpoint's names, and the ``(shift, scale)`` -> ``(scale, shift)`` swap of ``final_layer.adaLN_modulation.1``).

What differs from Flux.1: the double blocks' MLPs are SwiGLU ``ff.linear_in``/``ff.linear_out``; diffusers keeps the
single blocks' packed ``linear1`` as one module (``attn.to_qkv_mlp_proj``, a rename, not a split) and ``linear2`` is
``attn.to_out``; the per-block modulation layers are replaced by three shared ones (``double_stream_modulation_img``,
``double_stream_modulation_txt``, ``single_stream_modulation``); there is no pooled-text ``vector_in``. The double
blocks' ``img_attn.qkv`` / ``txt_attn.qkv`` still pack ``to_q/to_k/to_v`` / ``add_{q,k,v}_proj``.

diffusers' LoRA converters map ``final_layer.adaLN_modulation.1`` to ``norm_out.linear`` *without* the scale/shift swap
their own checkpoint converter applies (the kohya one drops the key); this map swaps, as the checkpoint converter and
Flux.1's LoRA converter do (the tests measure both).
"""

from __future__ import annotations

from .base import Arch, Rule

D = "double_blocks.{i}."
T = "transformer_blocks.{i}."
S = "single_blocks.{i}."
ST = "single_transformer_blocks.{i}."

RULES: tuple[Rule, ...] = (
    Rule(D + "img_attn.qkv", (T + "attn.to_q", T + "attn.to_k", T + "attn.to_v")),
    Rule(D + "img_attn.proj", (T + "attn.to_out.0",)),
    Rule(D + "img_mlp.0", (T + "ff.linear_in",)),
    Rule(D + "img_mlp.2", (T + "ff.linear_out",)),
    Rule(D + "txt_attn.qkv", (T + "attn.add_q_proj", T + "attn.add_k_proj", T + "attn.add_v_proj")),
    Rule(D + "txt_attn.proj", (T + "attn.to_add_out",)),
    Rule(D + "txt_mlp.0", (T + "ff_context.linear_in",)),
    Rule(D + "txt_mlp.2", (T + "ff_context.linear_out",)),
    Rule(S + "linear1", (ST + "attn.to_qkv_mlp_proj",)),
    Rule(S + "linear2", (ST + "attn.to_out",)),
    Rule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    Rule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    Rule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

FLUX2 = Arch(
    name="flux2",
    label="Flux.2",
    model_class="Flux2Transformer2DModel",
    # black-forest-labs/FLUX.2-dev transformer/config.json (the diffusers class defaults are this checkpoint's)
    config=dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True),
    rules=RULES,
    pipeline="Flux2Pipeline",
    layouts=("diffusers", "kohya", "comfyui", "ai-toolkit"),
    # comfyui: diffusers reads ai-toolkit's alpha-free `diffusion_model.` files, not ones with `.alpha` keys
    extra={"diffusers_reads": ("diffusers", "kohya", "ai-toolkit")},
    notes="diffusers `_convert_non_diffusers_flux2_lora_to_diffusers`, `_convert_kohya_flux2_lora_to_diffusers`, "
          "`convert_flux2_transformer_checkpoint_to_diffusers` (single_file_utils)",
)

__all__ = ["FLUX2", "RULES"]
