"""An output-layer LoRA on a model that ties lm_head to its input embedding lands: the base's files hold the tensor
once (under the embedding's name), and the certificate counts lm_head through the config's tie_word_embeddings."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

import adaptkit as ak
from adaptkit.formats.coverage import base_tensors


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    pm.save_pretrained(root / "ad")
    return root


def test_tied_lm_head_lands_on_the_saved_base(tied):
    _, shapes = base_tensors(tied / "base", tied_output=False)
    assert "lm_head.weight" not in shapes  # the file really holds the shared tensor once
    cert = ak.coverage(tied / "ad", tied / "base")
    assert cert.complete, cert.summary()
    assert {c.target for c in cert.layers if c.path == "lm_head"} == {"lm_head.weight"}


def test_untied_config_does_not_invent_lm_head(tied, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in (tied / "base").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    cert = ak.coverage(tied / "ad", base)
    # the LoRA and the full output weight peft saved beside it (save_embedding_layers) both miss
    assert sorted(c.path for c in cert.missing) == ["lm_head", "lm_head.base_layer.weight"]


def test_tied_lm_head_lands_on_a_module_and_a_config_only_base(tied, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(tied / "base")
    assert ak.coverage(tied / "ad", model).complete
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_bytes((tied / "base" / "config.json").read_bytes())
    assert ak.coverage(tied / "ad", cfg_only).complete
