"""LTX-Video (0.9.x): Lightricks' original module names <-> diffusers' ``LTXVideoTransformer3DModel``.

The two namespaces agree on every transformer block (``transformer_blocks.{i}.attn1.to_q``, ``attn2``,
``ff.net.0.proj``, ``ff.net.2``), the caption projection and ``proj_out``; they differ only at the top level, where
the original ``patchify_proj`` is diffusers' ``proj_in`` and the original ``adaln_single`` (timestep embedder and
the 6-way modulation ``linear``) is diffusers' ``time_embed``. No weight is packed and no row order differs.

Sources (no code copied):

* diffusers 0.42 ``loaders/single_file_utils.py`` ``convert_ltx_transformer_checkpoint_to_diffusers``: the original
  checkpoint's names become diffusers' by ``patchify_proj -> proj_in``, ``adaln_single -> time_embed`` (and the
  norms ``q_norm``/``k_norm``, which LoRAs do not target).
* ComfyUI ``comfy/ldm/lightricks/model.py`` ``LTXVModel`` (the module names ComfyUI loads natively:
  ``patchify_proj``, ``adaln_single``, ``caption_projection``, ``transformer_blocks``, ``proj_out``) and
  ``comfy/lora.py`` ``model_lora_keys_unet`` (generic ``diffusion_model.<path>`` / ``lora_unet_<flat>`` keys).
* diffusers ``loaders/lora_conversion_utils.py`` ``_convert_non_diffusers_ltxv_lora_to_diffusers`` (what
  ``LTXPipeline.lora_state_dict`` applies to ``diffusion_model.`` files) only strips the prefix: right for every
  block module, but a LoRA on ``patchify_proj`` or ``adaln_single.*`` comes out under names the diffusers model does
  not have (measured in ``tests/test_arch_ltx_video.py``).
"""

from __future__ import annotations

from .base import Arch, Rule

B = "transformer_blocks.{i}."

#: explicit names (no catch-all), so that other architectures' diffusers paths (Flux's ``transformer_blocks.{i}.attn``)
#: do not fit LTX-Video's map
RULES: tuple[Rule, ...] = (
    Rule("patchify_proj", ("proj_in",)),
    Rule("adaln_single.emb.timestep_embedder.linear_1", ("time_embed.emb.timestep_embedder.linear_1",)),
    Rule("adaln_single.emb.timestep_embedder.linear_2", ("time_embed.emb.timestep_embedder.linear_2",)),
    Rule("adaln_single.linear", ("time_embed.linear",)),
    Rule("caption_projection.linear_1", ("caption_projection.linear_1",)),
    Rule("caption_projection.linear_2", ("caption_projection.linear_2",)),
    *(Rule(B + f"{a}.{p}", (B + f"{a}.{p}",))
      for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    # the q/k norms (no LoRA target, but norm-diff layers name them): original ``q_norm``, diffusers ``norm_q``
    *(Rule(B + f"{a}.{n}_norm", (B + f"{a}.norm_{n}",)) for a in ("attn1", "attn2") for n in ("q", "k")),
    Rule(B + "ff.net.0.proj", (B + "ff.net.0.proj",)),
    Rule(B + "ff.net.2", (B + "ff.net.2",)),
    Rule("proj_out", ("proj_out",)),
)

LTX_VIDEO = Arch(
    name="ltx_video",
    label="LTX-Video",
    model_class="LTXVideoTransformer3DModel",
    # Lightricks/LTX-Video transformer/config.json (0.9.x 2B; the class defaults)
    config=dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
                qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
                attention_bias=True, attention_out_bias=True),
    rules=RULES,
    pipeline="LTXPipeline",
    # kohya: ComfyUI's generic key map reads `lora_unet_<flattened path>` for every model
    layouts=("diffusers", "kohya", "comfyui"),
    # diffusers' converter for the original layout reads no alphas (HunyuanVideo's raised on them): adaptkit's comfyui
    # files carry none (scale baked into lora_B), so it reads them (docs/architectures.md has the figures and limits)
    extra={"diffusers_reads": ("diffusers", "comfyui")},
    notes="diffusers `convert_ltx_transformer_checkpoint_to_diffusers`, "
          "`_convert_non_diffusers_ltxv_lora_to_diffusers`; ComfyUI `comfy/ldm/lightricks/model.py` `LTXVModel`",
)

__all__ = ["LTX_VIDEO", "RULES"]
