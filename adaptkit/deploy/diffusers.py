"""diffusers' rule table: what ``pipe.load_lora_weights`` does with each adapter feature, kept as data.

Read from the installed diffusers 0.42.1: ``diffusers/loaders/peft.py`` (``load_lora_adapter`` builds a peft
``LoraConfig`` from ``get_peft_kwargs`` in ``diffusers/utils/peft_utils.py``: ``r``, ``lora_alpha`` and per-module
``rank_pattern``/``alpha_pattern`` from the state dict and its ``.alpha`` entries, ``use_dora`` from
``lora_magnitude_vector`` keys, ``lora_bias`` from ``lora_B.bias``; ``use_rslora`` is never set), and
``diffusers/loaders/lora_conversion_utils.py`` (kohya/XLabs Flux names are converted only when recognised; a name it
does not convert is dropped without error: the coverage certificate against the base finds those).
"""

from __future__ import annotations

from .features import rule_maker
from .rules import Target

PEFT_UTILS = "diffusers/utils/peft_utils.py get_peft_kwargs (diffusers 0.42.1)"
LOADER = "diffusers/loaders/peft.py PeftAdapterMixin.load_lora_adapter (diffusers 0.42.1)"


_rule = rule_maker("diffusers", PEFT_UTILS)


RULES = (
    _rule("dora", "accepted", "diffusers loads DoRA (lora_magnitude_vector, 0.31+)"),
    _rule("bias", "accepted", "diffusers loads a LoRA bias (lora_B.bias, 0.32+)"),
    _rule("modules_to_save", "lossy", "diffusers LoRA files hold no modules_to_save copies", "fold_saved", LOADER),
    _rule("trainable_tokens", "exact", "diffusers LoRA files hold no trainable tokens", "through_base", LOADER),
    _rule("base_dependent", "exact", "diffusers loads LoRA only", "through_base", LOADER),
    _rule("target_parameters", "refused", "diffusers does not load target_parameters", source=LOADER),
    _rule("rslora", "exact", "diffusers never sets use_rslora: rsLoRA scales would be alpha / r", "bake_scale"),
    _rule("alpha_pattern", "accepted", "diffusers builds alpha_pattern from the per-module alphas"),
    _rule("rank_pattern", "accepted", "diffusers builds rank_pattern from the per-module ranks"),
    _rule("rank", "lossy", "a rank limit was asked for (--max-rank)", "truncate_rank"),
    _rule("other_kinds", "exact", "diffusers' PEFT loader takes LoRA only (LoHa/LoKr are not loaded)", "to_lora", LOADER),
    _rule("module_type", "accepted", "diffusers adapts convolutions (UNet LoCon)", source=LOADER),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): those layers match nothing", "fused", LOADER),
    _rule("zero_layers", "exact", "no-op layers do nothing", "drop_zero", LOADER),
)

TARGET = Target("diffusers", "diffusers", "diffusers", RULES, version="diffusers 0.42.1")

__all__ = ["RULES", "TARGET"]
