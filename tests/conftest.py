"""Shared fixtures: tiny seeded models built from configs, and adapters made with the real peft package.

Everything is built locally with random (seeded) weights; nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


def tiny_llama_config(**overrides):
    """A 2-layer llama small enough to build in milliseconds."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with seeded random weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def make_peft_adapter(path: Path, peft_config, seed: int = 0, model_seed: int = 0, model=None) -> Path:
    """Create an adapter with real peft on a tiny llama (random, non-zero init) and save it to ``path``."""
    from peft import get_peft_model

    base = model if model is not None else make_tiny_llama(model_seed)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, peft_config)
    peft_model.save_pretrained(str(path))
    return Path(path)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def input_ids():
    torch.manual_seed(1234)
    return torch.randint(0, 64, (2, 9))
