"""SD3 / SD3.5 (MMDiT): Stability AI's original module names <-> diffusers' ``SD3Transformer2DModel``.

Every joint block has an image stream ``x_block`` and a text stream ``context_block``; each packs its attention
projections into one ``attn.qkv`` weight (diffusers' ``to_q/to_k/to_v`` resp. ``add_{q,k,v}_proj``). SD3.5-medium adds
a second self-attention ``x_block.attn2`` (``attn2.to_q/k/v``, ``attn2.to_out.0``) in its first 13 blocks. The last
block's ``context_block`` is "pre-only": it has no ``attn.proj`` and no MLP, and its adaptive norm emits
``(shift, scale)`` where diffusers' ``AdaLayerNormContinuous`` emits ``(scale, shift)``, so that one rule swaps
(as ``final_layer.adaLN_modulation.1`` does). That rule names the last block's index, and SD3.5-medium's dual-attention
blocks have a 9-way adaptive norm (``9 * hidden`` rows, 6 elsewhere), so each released model has its own row (same
rules per depth, its own shipped inventory, so kohya files resolve by their shapes without a base): ``sd3``
(SD3-medium, 24 blocks), ``sd35_medium`` (24 blocks, ``attn2`` in 0-12) and ``sd35_large`` (38 blocks, 2432 wide).

Sources (read, not copied): diffusers 0.42.1 ``loaders/single_file_utils.py``
``convert_sd3_transformer_checkpoint_to_diffusers`` (names, ``attn2``, the two swaps); ComfyUI ``comfy/utils.py``
``mmdit_to_diffusers`` (``MMDIT_MAP_BLOCK``/``MMDIT_MAP_BASIC``, the same map incl. the last block's swap) and
``comfy/lora.py`` ``model_lora_keys_unet`` (reads ``lora_unet_<SAI name>``, ``diffusion_model.<SAI name>`` and the
diffusers names ``transformer.`` / ``lora_transformer_`` / ``base_model.model.``). diffusers itself converts no
non-diffusers SD3 LoRA layout: ``SD3LoraLoaderMixin.lora_state_dict`` only drops DoRA scales, so
``StableDiffusion3Pipeline`` reads diffusers-layout files only.
"""

from __future__ import annotations

from .base import Arch, Rule

J = "joint_blocks.{i}."
T = "transformer_blocks.{i}."


def sd3_rules(depth: int) -> tuple[Rule, ...]:
    """The SAI <-> diffusers rules of an MMDiT with ``depth`` joint blocks (the last one's text stream is pre-only)."""
    last = depth - 1
    return (
        Rule(J + "x_block.attn.qkv", (T + "attn.to_q", T + "attn.to_k", T + "attn.to_v")),
        Rule(J + "x_block.attn.proj", (T + "attn.to_out.0",)),
        Rule(J + "x_block.attn2.qkv", (T + "attn2.to_q", T + "attn2.to_k", T + "attn2.to_v")),
        Rule(J + "x_block.attn2.proj", (T + "attn2.to_out.0",)),
        Rule(J + "x_block.mlp.fc1", (T + "ff.net.0.proj",)),
        Rule(J + "x_block.mlp.fc2", (T + "ff.net.2",)),
        Rule(J + "x_block.adaLN_modulation.1", (T + "norm1.linear",)),
        Rule(J + "context_block.attn.qkv", (T + "attn.add_q_proj", T + "attn.add_k_proj", T + "attn.add_v_proj")),
        Rule(J + "context_block.attn.proj", (T + "attn.to_add_out",)),
        Rule(J + "context_block.mlp.fc1", (T + "ff_context.net.0.proj",)),
        Rule(J + "context_block.mlp.fc2", (T + "ff_context.net.2",)),
        Rule(f"joint_blocks.{last}.context_block.adaLN_modulation.1",
             (f"transformer_blocks.{last}.norm1_context.linear",), swap=True),
        Rule(J + "context_block.adaLN_modulation.1", (T + "norm1_context.linear",)),
        Rule("x_embedder.proj", ("pos_embed.proj",)),
        Rule("context_embedder", ("context_embedder",)),
        Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
    )


_COMMON = dict(
    pipeline="StableDiffusion3Pipeline",
    layouts=("diffusers", "kohya", "comfyui", "ai-toolkit"),
    extra={"diffusers_reads": ("diffusers", "ai-toolkit")},
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    notes="diffusers `convert_sd3_transformer_checkpoint_to_diffusers` (single_file_utils); ComfyUI `comfy/utils.py` "
          "`mmdit_to_diffusers`, `comfy/lora.py` `model_lora_keys_unet`; diffusers converts no non-diffusers SD3 LoRA",
)

SD3 = Arch(
    name="sd3",
    label="SD3 medium",
    model_class="SD3Transformer2DModel",
    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    rules=sd3_rules(24),
    **_COMMON,
)

SD35_MEDIUM = Arch(
    name="sd35_medium",
    label="SD3.5 medium",
    model_class="SD3Transformer2DModel",
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json: SD3-medium's sizes, plus attn2 and a 9-way
    # adaptive norm (x_block.adaLN_modulation.1 has 9 * 1536 rows) in blocks 0-12, and RMS q/k norms
    config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    rules=sd3_rules(24),
    **_COMMON,
)

SD35_LARGE = Arch(
    name="sd35_large",
    label="SD3.5 large",
    model_class="SD3Transformer2DModel",
    # stabilityai/stable-diffusion-3.5-large transformer/config.json
    config=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    rules=sd3_rules(38),
    **_COMMON,
)

__all__ = ["SD3", "SD35_LARGE", "SD35_MEDIUM", "sd3_rules"]
