"""PEFT's rule table: what ``PeftModel.from_pretrained`` does with each adapter feature, kept as data.

PEFT is the reference: it loads every feature adaptkit reads (peft 0.17+: ``target_parameters``; 0.15+:
``trainable_token_indices``; DoRA, ``lora_bias``, ``rank_pattern``/``alpha_pattern``, rsLoRA, ``modules_to_save``,
LoHa/LoKr/IA3/OFT and the other tuners). What can still go wrong is naming (the coverage certificate against a base
finds it) and no-op layers; a rank limit applies only when one is given.
"""

from __future__ import annotations

from .features import rule_maker
from .rules import Target

LORA = "peft/tuners/lora/model.py LoraModel (peft 0.17)"
SAVE = "peft/utils/save_and_load.py set_peft_model_state_dict (peft 0.17)"


_rule = rule_maker("peft", LORA)


RULES = (
    _rule("dora", "accepted", "PEFT loads DoRA (use_dora)"),
    _rule("bias", "accepted", "PEFT loads a LoRA bias (lora_bias=True)"),
    _rule("modules_to_save", "accepted", "PEFT loads modules_to_save copies", source=SAVE),
    _rule("trainable_tokens", "accepted", "PEFT loads trainable tokens (trainable_token_indices, peft 0.15+)"),
    _rule("base_dependent", "accepted", "PEFT has these tuners (OFT, BOFT, HRA, IA3 ...)",
          source="peft/tuners/__init__.py (peft 0.17)"),
    _rule("target_parameters", "accepted", "PEFT loads target_parameters (peft 0.17+)",
          source="peft/tuners/lora/layer.py ParamWrapper (peft 0.17)"),
    _rule("rslora", "accepted", "PEFT scales by alpha / sqrt(r) with use_rslora", source="peft/tuners/lora/layer.py"),
    _rule("alpha_pattern", "accepted", "PEFT resolves alpha_pattern per module",
          source="peft/utils/other.py get_pattern_key (peft 0.17)"),
    _rule("rank_pattern", "accepted", "PEFT resolves rank_pattern per module",
          source="peft/utils/other.py get_pattern_key (peft 0.17)"),
    _rule("rank", "lossy", "a rank limit was asked for (--max-rank)", "truncate_rank"),
    _rule("other_kinds", "accepted", "PEFT has these tuners (LoHa, LoKr, VeRA ...)",
          source="peft/tuners/__init__.py (peft 0.17)"),
    _rule("module_type", "accepted", "PEFT adapts convolutions and embeddings", source="peft/tuners/lora/layer.py"),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): PEFT would leave those layers out", "fused", LORA + " _create_and_replace"),
    _rule("zero_layers", "exact", "no-op layers do nothing", "drop_zero", LORA),
)

TARGET = Target("peft", "PEFT", "peft", RULES, version="peft 0.17+")

__all__ = ["RULES", "TARGET"]
