"""SGLang's rule table: what ``sglang.launch_server --lora-paths`` does with each adapter feature, kept as data.

Read from SGLang's source (main, 2025-2026): ``python/sglang/srt/lora/lora_config.py`` (``LoRAConfig`` reads
``target_modules``, ``r``, ``lora_alpha``, ``use_dora``; only newer versions read ``rank_pattern``/``alpha_pattern``
overrides), ``python/sglang/srt/lora/lora.py`` (``LoRAAdapter``: ``scaling = lora_alpha / r``, no rsLoRA),
``python/sglang/srt/lora/lora_manager.py`` (DoRA refused), ``python/sglang/srt/lora/utils.py``
(``get_normalized_target_modules`` maps leaf names, ``_KNOWN_LORA_TARGET_MODULES`` lists the modules LoRA can sit
on; older versions match ``target_modules`` entries as bare names, so prefixed names fail).
"""

from __future__ import annotations

from .features import leaf_names_outside, rule_maker
from .rules import Target

UTILS = "python/sglang/srt/lora/utils.py (main 2026)"
CONFIG = "python/sglang/srt/lora/lora_config.py LoRAConfig (main 2026)"
ADAPTER = "python/sglang/srt/lora/lora.py LoRAAdapter (main 2026)"

#: module leaf names SGLang puts LoRA on: ``_KNOWN_LORA_TARGET_MODULES`` plus the names its mapping normalises
MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "gate_up_proj",
           "down_proj", "embed_tokens", "lm_head", "in_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj",
           "fused_qkv_a_proj_with_mqa")


_rule = rule_maker("sglang", CONFIG)


RULES = (
    _rule("dora", "lossy", "SGLang refuses DoRA adapters", "fold_dora", CONFIG + " use_dora; "
          "python/sglang/srt/lora/lora_manager.py"),
    _rule("bias", "lossy", "SGLang loads lora_A/lora_B weights only: a LoRA bias is not applied", "drop_bias", ADAPTER),
    _rule("modules_to_save", "lossy", "SGLang does not load modules_to_save copies", "fold_saved", ADAPTER),
    _rule("trainable_tokens", "exact", "SGLang has no trainable_tokens_delta weight", "through_base", ADAPTER),
    _rule("base_dependent", "exact", "SGLang applies LoRA only (B A x)", "through_base", ADAPTER),
    _rule("target_parameters", "refused", "SGLang does not read target_parameters (MoE expert parameters)",
          source=CONFIG),
    _rule("rslora", "exact", "SGLang scales by lora_alpha / r (use_rslora is not read)", "bake_scale", ADAPTER),
    _rule("alpha_pattern", "exact", "SGLang applies one lora_alpha / r per adapter", "bake_scale", ADAPTER),
    _rule("rank_pattern", "exact", "SGLang sizes buffers by one r per adapter", "pad_rank", CONFIG),
    _rule("rank", "lossy", "SGLang refuses ranks above --max-lora-rank", "truncate_rank",
          "python/sglang/srt/lora/lora_manager.py (main 2026)"),
    _rule("other_kinds", "exact", "SGLang loads LoRA tensors only", "to_lora", ADAPTER),
    _rule("module_type", "refused", "SGLang has LoRA for linear layers and embeddings only", source=UTILS),
    _rule("module_names", "refused", "SGLang puts LoRA only on " + ", ".join(MODULES), source=UTILS
          + " _KNOWN_LORA_TARGET_MODULES", finds=leaf_names_outside(MODULES)),
    _rule("target_names", "exact", "SGLang matches target_modules as bare module names (prefixed or regex names fail)",
          "leaf_targets", UTILS + " get_normalized_target_modules"),
    _rule("init_weights", "refused", "SGLang applies the adapter to the unchanged base: PiSSA/OLoRA/CorDA/LoftQ inits "
          "need adaptkit convert 'pissa->lora' --initial INITIAL first", source=ADAPTER),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): those layers match nothing", "fused", UTILS + " get_normalized_target_modules"),
    _rule("zero_layers", "exact", "no-op layers cost SGLang memory and compute for nothing", "drop_zero", ADAPTER),
)

TARGET = Target("sglang", "SGLang", "peft", RULES, version="SGLang main (2026)",
                write_options={"target_names": "leaf"})

__all__ = ["MODULES", "RULES", "TARGET"]
