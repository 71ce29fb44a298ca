"""Lumina-Image 2.0: Alpha-VLLM's original (NextDiT) module names <-> diffusers' ``Lumina2Transformer2DModel``.

The blocks of ``noise_refiner``, ``context_refiner`` and ``layers`` keep their prefixes; inside them the original
``attention.qkv`` packs diffusers' ``attn.to_q``/``to_k``/``to_v`` (grouped-query attention: 24 query heads, 8
key/value heads of 96, so the rows are 2304 + 768 + 768), ``attention.out`` is ``attn.to_out.0``,
``feed_forward.w1``/``w2``/``w3`` are ``feed_forward.linear_1``/``linear_2``/``linear_3``, and the modulated blocks'
``adaLN_modulation.1`` is ``norm1.linear`` (``context_refiner`` blocks have none). At the top, ``t_embedder.mlp.{0,2}``
and ``cap_embedder`` live under ``time_caption_embed``, and the final layer's ``adaLN_modulation.1`` (a scale only,
no shift: nothing to swap) and ``linear`` are ``norm_out.linear_1``/``linear_2``.

Sources: diffusers 0.42 ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_lumina2_lora_to_diffusers``
(reads ``diffusion_model.`` files with ``lora_A``/``lora_B`` on the blocks only, no alphas, and hardcodes the qkv
split [2304, 768, 768] of the released model) and ``loaders/single_file_utils.py`` ``convert_lumina2_to_diffusers``
(the checkpoint key map, norms included); ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (``Lumina2``: the native
original names, plus ``z_image_to_diffusers`` for Z-Image's diffusers names); kohya sd-scripts
``networks/lora_lumina.py`` (``lora_unet_`` + flattened original names).
"""

from __future__ import annotations

from .base import Arch, Rule


def block_rules(prefix: str, modulated: bool) -> tuple[Rule, ...]:
    """The rules of one block family (``"layers"``, ``"noise_refiner"``, ``"context_refiner"``)."""
    o, d = f"{prefix}.{{i}}.", f"{prefix}.{{i}}."
    rules = [
        # q has the hidden size (= the input features), k and v share the rest
        Rule(o + "attention.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"), sizes=("in", "kv", "kv")),
        Rule(o + "attention.out", (d + "attn.to_out.0",)),
        Rule(o + "attention.q_norm", (d + "attn.norm_q",)),
        Rule(o + "attention.k_norm", (d + "attn.norm_k",)),
        *(Rule(o + f"feed_forward.w{n}", (d + f"feed_forward.linear_{n}",)) for n in (1, 2, 3)),
        Rule(o + "attention_norm1", (d + ("norm1.norm" if modulated else "norm1"),)),
        Rule(o + "attention_norm2", (d + "norm2",)),
        Rule(o + "ffn_norm1", (d + "ffn_norm1",)),
        Rule(o + "ffn_norm2", (d + "ffn_norm2",)),
    ]
    if modulated:
        rules.append(Rule(o + "adaLN_modulation.1", (d + "norm1.linear",)))
    return tuple(rules)


TE = "time_caption_embed."
RULES: tuple[Rule, ...] = (
    *block_rules("layers", True), *block_rules("noise_refiner", True), *block_rules("context_refiner", False),
    Rule("x_embedder", ("x_embedder",)),
    Rule("t_embedder.mlp.0", (TE + "timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", (TE + "timestep_embedder.linear_2",)),
    Rule("cap_embedder.0", (TE + "caption_embedder.0",)),
    Rule("cap_embedder.1", (TE + "caption_embedder.1",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear_1",)),
    Rule("final_layer.linear", ("norm_out.linear_2",)),
)

LUMINA2 = Arch(
    name="lumina2",
    label="Lumina-Image 2.0",
    model_class="Lumina2Transformer2DModel",
    # Alpha-VLLM/Lumina-Image-2.0 transformer/config.json
    config=dict(sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26, num_refiner_layers=2,
                num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
                scaling_factor=1.0, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304),
    rules=RULES,
    pipeline="Lumina2Pipeline",
    layouts=("diffusers", "kohya", "comfyui"),
    # its comfyui reader takes no `.alpha` (adaptkit writes none) and the released qkv split only
    extra={"diffusers_reads": ("diffusers", "comfyui")},
    notes="diffusers `_convert_non_diffusers_lumina2_lora_to_diffusers`, `convert_lumina2_to_diffusers`; ComfyUI "
          "`comfy/lora.py` `model_lora_keys_unet` (native names); sd-scripts `networks/lora_lumina.py`",
)

__all__ = ["LUMINA2", "RULES", "block_rules"]
