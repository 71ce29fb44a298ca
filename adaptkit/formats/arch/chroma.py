"""Chroma (lodestones' Flux.1-schnell derivative): BFL module names <-> diffusers' ``ChromaTransformer2DModel``.

Chroma keeps Flux.1's double/single blocks under BFL's names (:data:`~adaptkit.formats.arch.flux.BLOCK_RULES`: packed
``img_attn.qkv`` / ``txt_attn.qkv`` / single-block ``linear1``), drops the per-block modulation layers and the
pooled-text / guidance embedders, and computes every modulation vector with one "distilled guidance" approximator:
``distilled_guidance_layer.in_proj``, ``.layers.{i}.in_layer`` / ``.out_layer`` (an MLP embedder per layer, with an
RMSNorm ``.norms.{i}`` that LoRAs do not target) and ``.out_proj``. diffusers names the per-layer pair ``linear_1`` /
``linear_2``. The final layer has no adaptive-norm linear (its shift/scale come from the approximator).

Sources (read, not copied): diffusers 0.42.1 ``loaders/single_file_utils.py``
``convert_chroma_transformer_checkpoint_to_diffusers`` (the released checkpoint's names, incl. the approximator's);
``ChromaPipeline`` reads LoRAs with ``FluxLoraLoaderMixin.lora_state_dict``, i.e. Flux.1's converters
(``_convert_kohya_flux_lora_to_diffusers`` for sd-scripts files: it maps the blocks and rejects the approximator's
keys); ComfyUI loads Chroma LoRAs by its own (BFL) module names (``comfy/lora.py`` ``model_lora_keys_unet``:
``diffusion_model.<name>`` and ``lora_unet_<name flattened>`` for every weight of the model, and has no diffusers-name
branch for Chroma); Forge's Chroma port (``Approximator``: ``in_proj``, ``layers`` of ``MLPEmbedder`` with
``in_layer``/``out_layer``, ``norms``, ``out_proj``), which follows ComfyUI's.
"""

from __future__ import annotations

from .base import Arch, Rule
from .flux import BLOCK_RULES

G = "distilled_guidance_layer."

APPROXIMATOR_RULES: tuple[Rule, ...] = (
    Rule(G + "in_proj", (G + "in_proj",)),
    Rule(G + "layers.{i}.in_layer", (G + "layers.{i}.linear_1",)),
    Rule(G + "layers.{i}.out_layer", (G + "layers.{i}.linear_2",)),
    Rule(G + "out_proj", (G + "out_proj",)),
)
EMBEDDER_RULES: tuple[Rule, ...] = (
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("final_layer.linear", ("proj_out",), scale_one=True),  # Flux.1's kohya converter drops its alpha
)

CHROMA = Arch(
    name="chroma",
    label="Chroma",
    model_class="ChromaTransformer2DModel",
    # lodestones/Chroma1-HD transformer/config.json (the diffusers class defaults are this checkpoint's)
    config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5),
    rules=BLOCK_RULES + APPROXIMATOR_RULES + EMBEDDER_RULES,
    pipeline="ChromaPipeline",
    layouts=("diffusers", "kohya", "comfyui", "ai-toolkit"),
    # kohya: the blocks and embedders; Flux.1's converter refuses the approximator's keys
    extra={"diffusers_reads": ("diffusers", "kohya", "ai-toolkit")},
    notes="diffusers `convert_chroma_transformer_checkpoint_to_diffusers` (single_file_utils); ChromaPipeline reads "
          "LoRAs with FluxLoraLoaderMixin (`_convert_kohya_flux_lora_to_diffusers`); ComfyUI `model_lora_keys_unet` "
          "(BFL names only)",
)

__all__ = ["APPROXIMATOR_RULES", "CHROMA", "EMBEDDER_RULES"]
