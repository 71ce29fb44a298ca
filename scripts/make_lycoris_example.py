"""Generate the bundled LyCORIS example ``adaptkit/data/examples/lycoris_loha.safetensors`` with real lycoris-lora.

Run from the repository root: ``python scripts/make_lycoris_example.py``. It rebuilds the tiny llama the
other examples belong to (``base_config.json``: same config and seed), wraps its attention and MLP
linears in a LyCORIS LoHa network (``lycoris.create_lycoris``, rank 4, alpha 2), gives it random
trained-looking weights and saves it with LyCORIS's own ``save_weights`` in fp16: keys are LyCORIS's
flattened ``lycoris_model_layers_0_self_attn_q_proj.hada_w1_a`` names, so reading it needs the base model
(``adaptkit convert 'lycoris->peft' FILE OUT --base BASE_DIR``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "adaptkit" / "data" / "examples"
NAME = "lycoris_loha.safetensors"


def main() -> None:
    from lycoris import LycorisNetwork, create_lycoris
    from transformers import LlamaConfig, LlamaForCausalLM

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    spec = json.loads((OUT / "base_config.json").read_text())
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).eval()
    LycorisNetwork.apply_preset({"target_module": ["LlamaAttention", "LlamaMLP"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="loha")
    net.apply_to()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
                "ss_network_args": json.dumps({"algo": "loha"}), "modelspec.title": "adaptkit example LoHa",
                "adaptkit.example_base": spec["id"]}
    path = OUT / NAME
    net.save_weights(str(path), torch.float16, metadata)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(net.loras)} LoHa modules)")


if __name__ == "__main__":
    main()
