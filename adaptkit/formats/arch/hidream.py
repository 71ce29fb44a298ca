"""HiDream-I1: the original module names are diffusers' ``HiDreamImageTransformer2DModel`` names.

HiDream's reference code is written on diffusers' modules, and its checkpoints, diffusers' model and ComfyUI's
model name every module the same way (``double_stream_blocks.{i}.block.attn1.to_q``, ``to_q_t`` for the text
stream, the MoE feed-forward ``ff_i.experts.{j}.w1``/``w2``/``w3`` and ``ff_i.shared_experts.*``, ``ff_t.*`` of the
double blocks, ``caption_projection.{k}.linear``); only the file prefix differs (``diffusion_model.`` for the
original layout, ``transformer.`` for diffusers). The map is therefore one ``{path}`` rule per top-level module, so
that a name outside the model still fails the coverage check. No weight is packed; the MoE gate (``ff_i.gate``, a
parameter, not a Linear) is not a LoRA target.

Sources (no code copied): diffusers 0.42 ``loaders/lora_conversion_utils.py``
``_convert_non_diffusers_hidream_lora_to_diffusers`` (``HiDreamImagePipeline.lora_state_dict``: strips
``diffusion_model.``, adds ``transformer.``), ``loaders/single_file_utils.py``
``convert_hidream_transformer_to_diffusers`` (no renames); ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` (HiDream branch: ``transformer.<path>`` and
SimpleTuner's ``lycoris_<flattened path>`` keys name ComfyUI's own modules) and ``comfy/ldm/hidream/model.py``.
"""

from __future__ import annotations

from .base import Arch, Rule

TOP_LEVEL = ("t_embedder", "p_embedder", "x_embedder", "double_stream_blocks", "single_stream_blocks", "final_layer",
             "caption_projection")
RULES: tuple[Rule, ...] = tuple(Rule(f"{m}.{{path}}", (f"{m}.{{path}}",)) for m in TOP_LEVEL)

HIDREAM = Arch(
    name="hidream",
    label="HiDream-I1",
    model_class="HiDreamImageTransformer2DModel",
    # HiDream-ai/HiDream-I1-Full transformer/config.json (17B: 16 double + 32 single blocks, 4 routed experts, 2 active)
    config=dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
                llama_layers=[*range(32), *[31] * 16]),  # one Llama layer per block (48)
    rules=RULES,
    pipeline="HiDreamImagePipeline",
    layouts=("diffusers", "kohya", "comfyui"),
    # diffusers' converter for the original layout reads no alphas (HunyuanVideo's raised on them): adaptkit's comfyui
    # files carry none (scale baked into lora_B), so it reads them (docs/architectures.md has the figures and limits)
    extra={"diffusers_reads": ("diffusers", "comfyui")},
    notes="diffusers `_convert_non_diffusers_hidream_lora_to_diffusers`; ComfyUI `comfy/lora.py` "
          "`model_lora_keys_unet` (HiDream branch; SimpleTuner `lycoris_` names)",
)

__all__ = ["HIDREAM", "RULES", "TOP_LEVEL"]
