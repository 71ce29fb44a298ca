"""Generate the example adapters bundled in ``adaptkit/data/examples`` with the real peft package.

Run from the repository root: ``python scripts/make_examples.py``. It builds a tiny llama from a config
(seeded random weights, nothing downloaded), then saves two LoRA adapters trained-looking (random
non-zero init, different seeds, different ranks/targets) and a DoRA adapter, each as PEFT does. The
base model's config is written too, so the demo can rebuild the identical base with the same seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "adaptkit" / "data" / "examples"
BASE_SEED = 0
BASE_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
BASE_ID = "adaptkit-examples/tiny-llama"

ADAPTERS = {
    "lora_math": (1, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                init_lora_weights=False)),
    "lora_code": (2, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                rank_pattern={"down_proj": 8}, init_lora_weights=False)),
    "dora_style": (3, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                 init_lora_weights=False)),
}


def build_base() -> LlamaForCausalLM:
    """The tiny base model every example adapter belongs to (seeded, deterministic)."""
    torch.manual_seed(BASE_SEED)
    return LlamaForCausalLM(LlamaConfig(**BASE_CONFIG)).eval()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "base_config.json").write_text(json.dumps({"seed": BASE_SEED, "id": BASE_ID, "config": BASE_CONFIG}, indent=2) + "\n")
    for name, (seed, cfg) in ADAPTERS.items():
        target = OUT / name
        shutil.rmtree(target, ignore_errors=True)
        torch.manual_seed(seed)
        model = get_peft_model(build_base(), cfg)
        with torch.no_grad():  # make the example look trained: small, non-trivial B factors
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.0).add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(str(target))
        cfg_path = target / "adapter_config.json"  # peft writes the model's (empty) name; name the base
        written = json.loads(cfg_path.read_text())
        written["base_model_name_or_path"] = BASE_ID
        cfg_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        print("wrote", target)


if __name__ == "__main__":
    main()
