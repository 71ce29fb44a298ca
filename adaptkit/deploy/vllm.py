"""vLLM's rule table: what ``vllm serve --enable-lora`` does with each adapter feature, kept as data.

Read from vLLM's source (main, late 2025, v0.11 line): ``vllm/lora/peft_helper.py`` (``PEFTHelper`` reads only
``r``, ``lora_alpha``, ``target_modules``, ``bias``, ``modules_to_save``, ``use_rslora``, ``use_dora``;
``_validate_features`` refuses ``modules_to_save`` and DoRA; ``validate_legal`` refuses ``r > max_lora_rank`` and a
bias without ``bias_enabled``), ``vllm/lora/lora_model.py`` (``LoRAModel.from_local_checkpoint``: tensor names must
be ``lora_A/lora_B.weight`` or ``lora_embedding_A/B`` of an expected module; DoRA magnitudes raise
``NotImplementedError``), ``vllm/config/lora.py`` (``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``,
``max_lora_rank = 16``). rsLoRA scaling was ``alpha / r`` before vllm PR 6909 (v0.5.4); MoE ``target_parameters``
adapters load without error and change nothing (vllm PR 41384).
"""

from __future__ import annotations

from .features import FEATURES
from .rules import Rule, Target

PEFT_HELPER = "vllm/lora/peft_helper.py PEFTHelper (v0.11)"
LORA_MODEL = "vllm/lora/lora_model.py LoRAModel.from_local_checkpoint (v0.11)"


def _rule(feature: str, verdict: str, message: str, fix: str | None = None, source: str = PEFT_HELPER) -> Rule:
    return Rule(f"vllm.{feature}", feature, verdict, FEATURES[feature].detect, message, fix, source)


RULES = (
    _rule("dora", "lossy", "vLLM refuses DoRA ('vLLM does not yet support DoRA')", "fold_dora",
          PEFT_HELPER + " _validate_features; " + LORA_MODEL),
    _rule("bias", "lossy", "vLLM refuses a LoRA bias unless served with bias_enabled (removed in later versions)",
          "drop_bias", PEFT_HELPER + " validate_legal"),
    _rule("modules_to_save", "lossy", "vLLM refuses modules_to_save ('vLLM only supports modules_to_save being None')",
          "fold_saved", PEFT_HELPER + " _validate_features"),
    _rule("trainable_tokens", "exact", "vLLM has no trainable_tokens_delta weight ('unsupported LoRA weight')",
          "through_base", "vllm/lora/utils.py parse_fine_tuned_lora_name (v0.11)"),
    _rule("base_dependent", "exact", "vLLM applies LoRA only (B A x)", "through_base", LORA_MODEL),
    _rule("target_parameters", "refused", "vLLM ignores target_parameters: the MoE adapter loads and changes nothing",
          source="vllm PR 41384; " + PEFT_HELPER + " (no target_parameters field)"),
    _rule("rslora", "exact", "vLLM before v0.5.4 scales rsLoRA by alpha/r (vllm PR 6909)", "bake_scale",
          PEFT_HELPER + " __post_init__; vllm PR 6909"),
    _rule("alpha_pattern", "exact", "vLLM uses one lora_alpha / r for every layer (alpha_pattern is ignored)",
          "bake_scale", PEFT_HELPER + " (no alpha_pattern field)"),
    _rule("rank_pattern", "exact", "vLLM reads one r (rank_pattern is ignored)", "pad_rank",
          PEFT_HELPER + " (no rank_pattern field)"),
    _rule("rank", "lossy", "vLLM refuses r > max_lora_rank (default 16; serve with --max-lora-rank in 1, 8, 16, 32, 64, "
          "128, 256, 320, 512)", "truncate_rank", PEFT_HELPER + " validate_legal; vllm/config/lora.py MaxLoRARanks"),
    _rule("other_kinds", "exact", "vLLM loads LoRA tensors only (lora_A/lora_B)", "to_lora",
          "vllm/lora/utils.py parse_fine_tuned_lora_name (v0.11)"),
    _rule("module_type", "refused", "vLLM has LoRA for linear layers and embeddings only",
          source="vllm/lora/utils.py get_supported_lora_modules (v0.11)"),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): those layers match nothing", "fused", "vllm/lora/model_manager.py packed_modules_mapping (v0.11)"),
    _rule("zero_layers", "exact", "no-op layers cost vLLM memory and compute for nothing", "drop_zero", LORA_MODEL),
)

TARGET = Target("vllm", "vLLM", "peft", RULES, default_max_rank=16, rank_buckets=(1, 8, 16, 32, 64, 128, 256, 320, 512),
                version="vLLM v0.11 (main, 2025)")

__all__ = ["RULES", "TARGET"]
