"""HunyuanVideo: Tencent's original module names <-> diffusers' ``HunyuanVideoTransformer3DModel``.

Sources (the map is theirs; no code is copied):

* diffusers 0.42 ``loaders/lora_conversion_utils.py`` ``_convert_hunyuan_video_lora_to_diffusers`` (what
  ``HunyuanVideoPipeline.lora_state_dict`` applies to files with ``img_attn_qkv`` keys) and
  ``loaders/single_file_utils.py`` ``convert_hunyuan_video_transformer_to_diffusers``: ``img_attn_qkv`` packs
  ``to_q``/``to_k``/``to_v``, ``txt_attn_qkv`` the ``add_*_proj`` projections, ``single_blocks.{i}.linear1`` packs
  ``to_q``/``to_k``/``to_v``/``proj_mlp``, ``final_layer.adaLN_modulation.1`` emits ``(shift, scale)`` where
  ``norm_out.linear`` emits ``(scale, shift)``, and ``txt_in``'s token refiner (``individual_token_refiner.blocks``,
  ``self_attn_qkv``, ``mlp.fc1``, ``adaLN_modulation.1``) becomes ``context_embedder.token_refiner.refiner_blocks``.
* ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (HunyuanVideo branch): ``diffusion_model.<original path>`` and
  ``transformer.<original path>`` keys in these names ("diffusion-pipe lora format"), e.g.
  ``double_blocks.0.img_attn_qkv``, ``img_mod.linear``, ``img_mlp.fc1``, ``single_blocks.0.modulation.linear``.
* musubi-tuner (``networks/lora.py``, ``HUNYUAN_TARGET_REPLACE_MODULES``: the double/single stream blocks, the
  modulation layers excluded by default) trains these modules and writes ``lora_unet_<flattened original path>``.
* ComfyUI ``comfy/ldm/hunyuan_video/model.py``: ComfyUI's own HunyuanVideo is built from Flux's layers, so its generic
  keys name ``img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``, ``time_in.in_layer``...; those are read as aliases
  (:data:`COMFY_ALIAS_RULES`).

The flattened kohya names of the attention and single-block modules (``double_blocks_0_img_attn_qkv``,
``single_blocks_0_linear1``, ``final_layer_linear``) are the same strings as Flux.1's at the same shapes
(hidden 3072, linear1 21504 x 3072); only the modulation (``img_mod_linear`` vs ``img_mod_lin``) and MLP
(``img_mlp_fc1`` vs ``img_mlp_0``) names tell the two apart.
"""

from __future__ import annotations

from .base import Arch, Rule

D = "double_blocks.{i}."
T = "transformer_blocks.{i}."
S = "single_blocks.{i}."
ST = "single_transformer_blocks.{i}."
R = "txt_in.individual_token_refiner.blocks.{i}."
RD = "context_embedder.token_refiner.refiner_blocks.{i}."

DOUBLE_RULES: tuple[Rule, ...] = (
    Rule(D + "img_attn_qkv", (T + "attn.to_q", T + "attn.to_k", T + "attn.to_v")),
    Rule(D + "img_attn_proj", (T + "attn.to_out.0",)),
    Rule(D + "img_mlp.fc1", (T + "ff.net.0.proj",)),
    Rule(D + "img_mlp.fc2", (T + "ff.net.2",)),
    Rule(D + "img_mod.linear", (T + "norm1.linear",)),
    Rule(D + "txt_attn_qkv", (T + "attn.add_q_proj", T + "attn.add_k_proj", T + "attn.add_v_proj")),
    Rule(D + "txt_attn_proj", (T + "attn.to_add_out",)),
    Rule(D + "txt_mlp.fc1", (T + "ff_context.net.0.proj",)),
    Rule(D + "txt_mlp.fc2", (T + "ff_context.net.2",)),
    Rule(D + "txt_mod.linear", (T + "norm1_context.linear",)),
)
SINGLE_RULES: tuple[Rule, ...] = (
    Rule(S + "linear1", (ST + "attn.to_q", ST + "attn.to_k", ST + "attn.to_v", ST + "proj_mlp"),
         sizes=("in", "in", "in", "mlp")),
    Rule(S + "linear2", (ST + "proj_out",)),
    Rule(S + "modulation.linear", (ST + "norm.linear",)),
)
#: the text token refiner (``txt_in``, diffusers' ``context_embedder``); its adaptive norm emits (gate_msa, gate_mlp)
#: in both namespaces
REFINER_RULES: tuple[Rule, ...] = (
    Rule(R + "self_attn_qkv", (RD + "attn.to_q", RD + "attn.to_k", RD + "attn.to_v")),
    Rule(R + "self_attn_proj", (RD + "attn.to_out.0",)),
    Rule(R + "mlp.fc1", (RD + "ff.net.0.proj",)),
    Rule(R + "mlp.fc2", (RD + "ff.net.2",)),
    Rule(R + "adaLN_modulation.1", (RD + "norm_out.linear",)),
    Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
    Rule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    Rule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    Rule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    Rule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
)
EMBEDDER_RULES: tuple[Rule, ...] = (
    Rule("img_in.proj", ("x_embedder.proj",)),
    Rule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)

#: ComfyUI's own module names for HunyuanVideo (``comfy/ldm/hunyuan_video/model.py`` builds it from Flux's layers:
#: ``img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``, ``MLPEmbedder``'s ``in_layer``/``out_layer``), which its generic
#: ``diffusion_model.<path>`` / ``lora_unet_<flat>`` keys name; read as aliases (the Tencent names above come first,
#: so they are what adaptkit writes: diffusers' converter and ComfyUI's HunyuanVideo key map both read those)
COMFY_ALIAS_RULES: tuple[Rule, ...] = (
    *(Rule(D + f"{s}_attn.qkv", rule.diffusers) for s, rule in (("img", DOUBLE_RULES[0]), ("txt", DOUBLE_RULES[5]))),
    Rule(D + "img_attn.proj", (T + "attn.to_out.0",)),
    Rule(D + "img_mlp.0", (T + "ff.net.0.proj",)),
    Rule(D + "img_mlp.2", (T + "ff.net.2",)),
    Rule(D + "img_mod.lin", (T + "norm1.linear",)),
    Rule(D + "txt_attn.proj", (T + "attn.to_add_out",)),
    Rule(D + "txt_mlp.0", (T + "ff_context.net.0.proj",)),
    Rule(D + "txt_mlp.2", (T + "ff_context.net.2",)),
    Rule(D + "txt_mod.lin", (T + "norm1_context.linear",)),
    Rule(S + "modulation.lin", (ST + "norm.linear",)),
    Rule(R + "self_attn.qkv", REFINER_RULES[0].diffusers),
    Rule(R + "self_attn.proj", (RD + "attn.to_out.0",)),
    Rule(R + "mlp.0", (RD + "ff.net.0.proj",)),
    Rule(R + "mlp.2", (RD + "ff.net.2",)),
    Rule("txt_in.t_embedder.in_layer", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    Rule("txt_in.t_embedder.out_layer", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    Rule("txt_in.c_embedder.in_layer", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    Rule("txt_in.c_embedder.out_layer", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
)

HUNYUAN_VIDEO = Arch(
    name="hunyuan_video",
    label="HunyuanVideo",
    model_class="HunyuanVideoTransformer3DModel",
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (HunyuanVideo T2V 13B; the class defaults)
    config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
    rules=DOUBLE_RULES + SINGLE_RULES + REFINER_RULES + EMBEDDER_RULES + COMFY_ALIAS_RULES,
    pipeline="HunyuanVideoPipeline",
    layouts=("diffusers", "kohya", "comfyui"),
    # diffusers' converter for the original layout reads no alphas (HunyuanVideo's raised on them): adaptkit's comfyui
    # files carry none (scale baked into lora_B), so it reads them (docs/architectures.md has the figures and limits)
    extra={"diffusers_reads": ("diffusers", "comfyui")},
    notes="diffusers `_convert_hunyuan_video_lora_to_diffusers`, `convert_hunyuan_video_transformer_to_diffusers`; "
          "ComfyUI `comfy/lora.py` `model_lora_keys_unet` (HunyuanVideo branch); musubi-tuner `lora_unet_` names",
)

__all__ = ["COMFY_ALIAS_RULES", "DOUBLE_RULES", "EMBEDDER_RULES", "HUNYUAN_VIDEO", "REFINER_RULES", "SINGLE_RULES"]
