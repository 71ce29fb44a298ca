"""Wan 2.x: Wan-AI's original module names <-> diffusers' ``WanTransformer3DModel``.

Every rule is a rename (no packed weights): the original ``blocks.{i}.self_attn.q``/``k``/``v``/``o`` are diffusers'
``blocks.{i}.attn1.to_q``/``to_k``/``to_v``/``to_out.0``, ``cross_attn`` is ``attn2`` (its image keys ``k_img``/
``v_img`` of the I2V models are ``add_k_proj``/``add_v_proj``), ``ffn.0``/``ffn.2`` are ``ffn.net.0.proj``/
``ffn.net.2``, the embedders ``text_embedding.{0,2}``, ``time_embedding.{0,2}``, ``time_projection.1`` live under
``condition_embedder``, ``head.head`` is ``proj_out``, the I2V image MLP ``img_emb.proj.{0,1,3,4}`` is
``condition_embedder.image_embedder``, and the Conv3d ``patch_embedding`` keeps its name. The affine cross-attention
norm is ``norm3`` in the original and ``norm2`` in diffusers (the norm rules serve ``.diff`` files; LoRA trainers
target only the Linear layers). ``time_projection.1`` emits the six modulation chunks in the same order in both
namespaces, so nothing is swapped.

Sources: diffusers 0.42 ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_wan_lora_to_diffusers``
(``diffusion_model.`` files: ComfyUI, lightx2v, ai-toolkit) and ``_convert_musubi_wan_lora_to_diffusers``
(musubi-tuner's ``lora_unet_`` + flattened original names + ``.alpha``), ``loaders/single_file_utils.py``
``convert_wan_transformer_to_diffusers`` (the checkpoint key map, incl. the norm2/norm3 exchange); ComfyUI
``comfy/lora.py`` ``model_lora_keys_unet`` (WAN models take the generic ``diffusion_model.<name>`` and
``lora_unet_<flattened name>`` keys of the native model, i.e. the original names).

Wan 2.2 A14B (T2V/I2V: two experts, diffusers ``transformer`` and ``transformer_2``, each the 2.1-14B shape) and
TI2V-5B (dim 3072, 30 blocks, 48 latent channels, no image cross-attention) are the same class with the same module
names, so one row serves them; the shipped inventory is Wan 2.1 T2V-14B's (no ``k_img``/``img_emb``: the I2V-14B
models add ``image_dim=1280, added_kv_proj_dim=5120, in_channels=36``).
"""

from __future__ import annotations

from .base import Arch, Rule

B = "blocks.{i}."
CE = "condition_embedder."

ATTENTION_RULES: tuple[Rule, ...] = tuple(
    Rule(B + f"{orig}.{o}", (B + f"{diff}.{d}",))
    for orig, diff in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                 ("norm_k", "norm_k"))
) + (
    Rule(B + "cross_attn.k_img", (B + "attn2.add_k_proj",)),
    Rule(B + "cross_attn.v_img", (B + "attn2.add_v_proj",)),
    Rule(B + "cross_attn.norm_k_img", (B + "attn2.norm_added_k",)),
)
BLOCK_RULES: tuple[Rule, ...] = ATTENTION_RULES + (
    Rule(B + "ffn.0", (B + "ffn.net.0.proj",)),
    Rule(B + "ffn.2", (B + "ffn.net.2",)),
    Rule(B + "norm3", (B + "norm2",)),
)
EMBEDDER_RULES: tuple[Rule, ...] = (
    Rule("patch_embedding", ("patch_embedding",)),
    Rule("text_embedding.0", (CE + "text_embedder.linear_1",)),
    Rule("text_embedding.2", (CE + "text_embedder.linear_2",)),
    Rule("time_embedding.0", (CE + "time_embedder.linear_1",)),
    Rule("time_embedding.2", (CE + "time_embedder.linear_2",)),
    Rule("time_projection.1", (CE + "time_proj",)),
    Rule("img_emb.proj.0", (CE + "image_embedder.norm1",)),
    Rule("img_emb.proj.1", (CE + "image_embedder.ff.net.0.proj",)),
    Rule("img_emb.proj.3", (CE + "image_embedder.ff.net.2",)),
    Rule("img_emb.proj.4", (CE + "image_embedder.norm2",)),
    Rule("head.head", ("proj_out",)),
)

WAN = Arch(
    name="wan",
    label="Wan 2.x",
    model_class="WanTransformer3DModel",
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
    config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                rope_max_seq_len=1024),
    rules=BLOCK_RULES + EMBEDDER_RULES,
    pipeline="WanPipeline",
    layouts=("diffusers", "kohya", "comfyui"),
    # comfyui: block LoRAs (diffusers reads no embedder/head alpha and no patch_embedding key)
    extra={"diffusers_reads": ("diffusers", "kohya", "comfyui")},
    notes="diffusers `_convert_non_diffusers_wan_lora_to_diffusers`, `_convert_musubi_wan_lora_to_diffusers`, "
          "`convert_wan_transformer_to_diffusers`; ComfyUI `comfy/lora.py` `model_lora_keys_unet` (native names); "
          "musubi-tuner trains the transformer only (not umT5)",
)

__all__ = ["BLOCK_RULES", "EMBEDDER_RULES", "WAN"]
